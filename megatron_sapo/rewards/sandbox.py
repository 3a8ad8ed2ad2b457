"""Run untrusted Python (model completions) in an isolated, resource-limited process.

    result = run_python("print(input()[::-1])", stdin="abc\\n", limits=SandboxLimits(wall_s=2))
    result.ok, result.stdout, result.timed_out, result.isolation

Every run gets its own launcher process (_sandbox_launcher.py, started fresh, so this is safe from threads)
that isolates itself, then forks the program. Limits: CPU time (RLIMIT_CPU), wall time (killed by the
launcher; a backstop here), address space (RLIMIT_AS/DATA), process count (RLIMIT_NPROC), file size
(RLIMIT_FSIZE, which also caps the captured stdout/stderr since they are files), open files, no core
dumps. Where Linux namespaces are allowed (root, or unprivileged user namespaces), the program also has no
network, its own root filesystem without /etc, /home, /root or the project, a size-limited tmpfs as its
only writable directory, and dies with all its children. As root it runs as a separate unprivileged uid
(one per concurrent run, so process-count limits are not shared). What was in effect is in
`result.isolation` and `isolation_report()`; see the launcher's docstring for the fallback when namespaces
are refused, and set `SandboxLimits.require_isolation` to refuse to run without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")
_UID_BASE = 200_000 + (os.getpid() % 4096) * 256  # per trainer process, so nodes with many ranks rarely share


class SandboxUnavailable(RuntimeError):
    """Full isolation was required but the machine refuses namespaces."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: float = 2.0
    wall_s: float = 4.0
    memory_mb: int = 512  # address space per process
    nproc: int = 16  # processes and threads of the sandbox uid
    file_mb: int = 8  # largest file the program may write (stdout/stderr included)
    disk_mb: int = 32  # total size of its writable directory (with namespaces)
    output_chars: int = 1_000_000  # stdout/stderr kept in the result
    namespaces: bool = True  # try to isolate with namespaces
    require_isolation: bool = False  # raise SandboxUnavailable when namespaces are refused


@dataclass
class SandboxResult:
    exit_code: int | None  # negative: killed by that signal; None: did not run
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    isolation: dict = field(default_factory=dict)
    setup_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.setup_error is None

    @property
    def failure(self) -> str | None:
        """A short reason when not ok: timeout, a signal name, an exit code, or the setup error."""
        if self.setup_error:
            return f"sandbox setup failed: {self.setup_error}"
        if self.timed_out:
            return "wall-time limit"
        if self.exit_code is None or self.exit_code == 0:
            return None
        if self.exit_code < 0:
            names = {signal.SIGXCPU: "cpu-time limit", signal.SIGXFSZ: "file-size limit"}
            sig = signal.Signals(-self.exit_code)
            return names.get(sig, f"killed by {sig.name}")
        return f"exit code {self.exit_code}"


class _UidPool:
    """Separate uids for concurrent runs (as root): RLIMIT_NPROC is counted per uid."""

    def __init__(self, base: int, size: int = 256):
        self._free = list(range(base, base + size))
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)

    def acquire(self) -> int:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def release(self, uid: int) -> None:
        with self._cond:
            self._free.append(uid)
            self._cond.notify()


_UIDS = _UidPool(_UID_BASE)


def _world_executable(path: str) -> bool:
    """Can any uid run `path` (every directory above it searchable by others, the file executable)?"""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & 0o001:
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & 0o001:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _interpreter(namespaces: bool) -> tuple[str, list[str]]:
    """The interpreter for the program (a base one, not a venv shim) and the directories it needs.

    With namespaces its installation is bind-mounted read-only wherever it lives. Without them, as root, the
    separate uid must be able to reach it: a base interpreter under e.g. /root (mode 700) is skipped for the
    system python3."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if not namespaces and os.geteuid() == 0 and not _world_executable(python):
        found = [p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if _world_executable(p)]
        if found:
            python = os.path.realpath(found[0])
    prefix = os.path.realpath(sys.base_prefix) if python.startswith(os.path.realpath(sys.base_prefix)) else None
    paths = {os.path.dirname(python)} | ({prefix} if prefix else set())
    return python, sorted(paths)


def _read(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a Python program with `stdin`; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    python, ro_paths = _interpreter(limits.namespaces)
    is_root = os.geteuid() == 0
    uid = _UIDS.acquire() if is_root else os.getuid()
    host = tempfile.mkdtemp(prefix="msapo_sandbox_")
    try:
        os.chmod(host, 0o711)  # the sandbox uid may enter (to reach workdir in fallback mode), not list
        program = os.path.join(host, "prog.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(program, 0o600)
        os.mkdir(os.path.join(host, "root"), 0o755)
        cfg = {
            "python": python,
            "ro_paths": ro_paths,
            "program": program,
            "root": os.path.join(host, "root"),
            "workdir": os.path.join(host, "work"),
            "status": os.path.join(host, "status.json"),
            "uid": uid,
            "gid": uid,
            "namespaces": limits.namespaces,
            **{k: getattr(limits, k) for k in ("cpu_s", "wall_s", "memory_mb", "nproc", "file_mb", "disk_mb")},
        }
        paths = {name: os.path.join(host, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin)
        with (
            open(paths["stdin"], "rb") as fin,
            open(paths["stdout"], "wb") as fout,
            open(paths["stderr"], "wb") as ferr,
        ):
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", _LAUNCHER, json.dumps(cfg)],
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                close_fds=True,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            with contextlib.suppress(subprocess.TimeoutExpired):  # the launcher enforces wall_s; a backstop
                proc.wait(timeout=limits.wall_s + 10)
            _killpg(proc.pid)  # whatever is left of the group (fallback mode without pid namespace)
            proc.wait()
        status = _status(cfg["status"], proc.returncode)
        stderr = _read(paths["stderr"], limits.output_chars)
        if status.get("exit_code") == 126 and stderr.startswith("sandbox setup failed"):
            status["setup_error"] = stderr.strip()  # the program never ran
        result = SandboxResult(
            exit_code=status.get("exit_code"),
            stdout=_read(paths["stdout"], limits.output_chars),
            stderr=stderr,
            timed_out=bool(status.get("timed_out", False)),
            wall_s=float(status.get("wall_s", 0.0)),
            isolation=status.get("isolation", {}),
            setup_error=status.get("setup_error"),
        )
    finally:
        shutil.rmtree(host, ignore_errors=True)
        if is_root:
            _UIDS.release(uid)
    _check_isolation(result, limits)
    return result


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _status(path: str, launcher_rc: int | None) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {"setup_error": f"the sandbox launcher died (exit status {launcher_rc}) without a status"}


_warned = False


def _check_isolation(result: SandboxResult, limits: SandboxLimits) -> None:
    global _warned
    iso = result.isolation
    if result.setup_error is None and iso and not (iso.get("mount_ns") and iso.get("net_ns")):
        if limits.require_isolation and limits.namespaces:
            raise SandboxUnavailable(
                "namespaces are refused on this machine (unshare failed), so the code sandbox cannot block "
                "the network or hide files; run as root or enable user namespaces (sysctl "
                "kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0)"
            )
        if not _warned:
            _warned = True
            log.warning(
                "code sandbox without namespaces: rlimits, temp dir and scrubbed env only (isolation: %s); "
                "the program can reach the network and read world-readable files",
                iso,
            )


_report: dict | None = None


def isolation_report() -> dict:
    """What the sandbox achieves on this machine (runs one tiny probe program; cached)."""
    global _report
    if _report is None:
        res = run_python("print('ok')", limits=SandboxLimits(wall_s=10))
        _report = {**res.isolation, "works": res.ok and res.stdout.strip() == "ok", "error": res.failure}
        _report["limits"] = asdict(SandboxLimits())
    return dict(_report)
