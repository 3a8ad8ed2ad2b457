"""Sandbox launcher: run as `python -I -S _sandbox_launcher.py CONFIG_JSON`; stdlib only (no package imports).

Started by megatron_sapo.rewards.sandbox as a fresh, single-threaded process (so no preexec_fn in a threaded
parent). It isolates itself, forks the program's process, enforces the wall time and writes a status JSON
(outside the sandbox) for the parent. Isolation, strongest first:

1. Namespaces: unshare(mount, network, pid, ipc, uts) - plus a user namespace when not root. The program
   gets a new root: a small tmpfs holding read-only, nosuid bind mounts of /usr, /lib*, /bin, /sbin and the
   Python installation, /dev/{null,zero,random,urandom}, and a size-limited tmpfs at /sandbox (its cwd and
   HOME). No /etc, /home, /root, /proc, /work: project files and /etc/passwd do not exist for it. The new
   network namespace has only a down loopback: every connect() fails. It is pid 1 of its pid namespace, so
   when it exits or is killed every process it started dies with it.
2. As root, the program also runs as a separate unprivileged uid/gid (so RLIMIT_NPROC applies and it owns
   nothing outside /sandbox); without root it runs as the caller's uid mapped to uid 1000 in its namespace.
3. Fallback when unshare is refused (seccomp, user namespaces disabled): rlimits, a fresh temp directory,
   scrubbed environment, and (as root) the separate uid, whose processes are all killed afterwards. No
   network or read isolation then: the status reports which pieces were in effect.
"""

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SANDBOX_UID_IN_USERNS = 1000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _bind_ro(src: str, dst: str) -> None:
    _mount(src, dst, None, MS_BIND | MS_REC)
    _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _unshare(is_root: bool) -> bool:
    """Enter new namespaces; False when the kernel or a seccomp filter refuses."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if not is_root:
        flags |= CLONE_NEWUSER
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        return False
    if not is_root:  # map our uid to a non-zero uid inside: the program loses the namespace's caps at exec
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{SANDBOX_UID_IN_USERNS} {uid} 1\n")
        _write("/proc/self/gid_map", f"{SANDBOX_UID_IN_USERNS} {gid} 1\n")
    return True


def _build_root(cfg: dict, owner: tuple[int, int]) -> None:
    """A fresh root filesystem at cfg['root'] (see the module docstring)."""
    root = cfg["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    system = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"]
    extra = [p for p in cfg["ro_paths"] if not any(p == s or p.startswith(s + "/") for s in system)]
    for path in system + extra:
        if not os.path.lexists(path):
            continue
        dst = root + path
        if os.path.islink(path) and path in system:  # e.g. /bin -> usr/bin on merged-/usr systems
            os.symlink(os.readlink(path), dst)
            continue
        os.makedirs(dst, mode=0o755, exist_ok=True)
        _bind_ro(os.path.realpath(path), dst)
    os.makedirs(root + "/dev", mode=0o755)
    for dev in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    work = root + "/sandbox"
    os.makedirs(work, mode=0o755)
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=700")
    shutil.copy(cfg["program"], work + "/prog.py")
    os.chown(work, *owner)
    os.chown(work + "/prog.py", *owner)


def _limits(cfg: dict, nproc: int) -> None:
    mb = 1024 * 1024
    cpu = max(1, int(cfg["cpu_s"] + 0.999))
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (cfg["memory_mb"] * mb,) * 2),
        (resource.RLIMIT_DATA, (cfg["memory_mb"] * mb,) * 2),
        (resource.RLIMIT_FSIZE, (cfg["file_mb"] * mb,) * 2),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
    ):
        resource.setrlimit(res, value)


def _user_procs(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts) owned by uid; for the non-namespace, non-root case."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return count


def _exec_program(cfg: dict, iso: dict, owner: tuple[int, int], cwd: str) -> None:
    """Limits, drop privileges, exec the program. Never returns."""
    try:
        nproc = cfg["nproc"]
        if not iso["separate_uid"] and not iso["user_ns"]:
            nproc += _user_procs(os.getuid())  # NPROC counts all the caller's tasks
        _limits(cfg, nproc)
        if iso["separate_uid"]:
            os.setgroups([])
            os.setgid(owner[1])
            os.setuid(owner[0])
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", cwd + "/prog.py"], env)
    except BaseException as e:  # noqa: BLE001 - report and leave; the program never ran
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
    os._exit(126)


def _child(cfg: dict, iso: dict, owner: tuple[int, int], report_fd: int) -> None:
    """The forked child: with a pid namespace it is pid 1 there, a waiter that forks the program
    (pid 1 ignores default-action signals such as SIGXCPU, so the program must not be pid 1) and reports its
    wait status through report_fd; when pid 1 exits, the kernel kills everything left in the
    namespace. Never returns."""
    code = 126
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if iso["mount_ns"]:
            os.chroot(cfg["root"])
            cwd = "/sandbox"
        else:
            cwd = cfg["workdir"]
        os.chdir(cwd)
        if not iso["pid_ns"]:
            _exec_program(cfg, iso, owner, cwd)
        pid = os.fork()
        if pid == 0:
            os.close(report_fd)
            _exec_program(cfg, iso, owner, cwd)
        _, wstatus = os.waitpid(pid, 0)
        os.write(report_fd, str(wstatus).encode())
        code = 0
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
    os._exit(code)


def _kill_uid(uid: int, gid: int) -> None:
    """Kill every process of uid: a helper that becomes uid sends SIGKILL to all it may signal (kill(-1))."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            for _ in range(3):
                os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    is_root = os.geteuid() == 0
    status: dict = {"setup_error": None}
    iso = {"mount_ns": False, "net_ns": False, "pid_ns": False, "user_ns": False, "separate_uid": is_root}
    owner = (cfg["uid"], cfg["gid"]) if is_root else (os.getuid(), os.getgid())
    try:
        if cfg["namespaces"] and _unshare(is_root):
            iso.update(mount_ns=True, net_ns=True, pid_ns=True, user_ns=not is_root)
            if not is_root:
                owner = (SANDBOX_UID_IN_USERNS, SANDBOX_UID_IN_USERNS)
            _build_root(cfg, owner)
        else:
            os.makedirs(cfg["workdir"], mode=0o700)
            shutil.copy(cfg["program"], cfg["workdir"] + "/prog.py")
            if is_root:
                os.chown(cfg["workdir"], *owner)
                os.chown(cfg["workdir"] + "/prog.py", *owner)
    except OSError as e:
        status["setup_error"] = f"{e!r}"
    status["isolation"] = iso
    if status["setup_error"] is None:
        start = time.monotonic()
        read_fd, report_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(cfg, iso, owner, report_fd)
        os.close(report_fd)
        fd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        timed_out = not poller.poll(int(cfg["wall_s"] * 1000))
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, wstatus = os.waitpid(pid, 0)
        status["wall_s"] = time.monotonic() - start
        status["timed_out"] = timed_out
        reported = os.read(read_fd, 64)  # the program's wait status, from pid 1 of the namespace
        os.close(read_fd)
        if reported:
            wstatus = int(reported)
        elif iso["pid_ns"] and not timed_out:
            status["setup_error"] = "the sandbox's pid 1 exited without reporting the program's status"
        status["exit_code"] = os.waitstatus_to_exitcode(wstatus)
        if not iso["pid_ns"] and iso["separate_uid"]:  # stragglers outlive pid 1 here: kill them all
            _kill_uid(*owner)
        # (non-root without namespaces: the parent kills our process group once we have exited)
    tmp = cfg["status"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, cfg["status"])


if __name__ == "__main__":
    main()
