"""The code sandbox against hostile completions: each contained, scored as a failure, the machine unharmed."""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_sapo.rewards import compute_reward, isolation_report
from megatron_sapo.rewards.sandbox import _UID_BASE, SandboxLimits, run_python

FAST = SandboxLimits(cpu_s=1, wall_s=1.5, memory_mb=256, nproc=8, file_mb=2, disk_mb=8)
ISO = isolation_report()
needs_ns = pytest.mark.skipif(
    not (ISO.get("mount_ns") and ISO.get("net_ns")),
    reason=f"namespaces refused on this machine (fallback sandbox in use: {ISO})",
)


def _sandbox_procs() -> list[int]:
    """Live processes owned by this test process's sandbox uids (root) - there must be none after a run."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                st = os.stat(f"/proc/{pid}")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if _UID_BASE <= st.st_uid < _UID_BASE + 256 and state != "Z":
                pids.append(int(pid))
    return pids


def _as_code(program: str) -> str:
    return f"Here is my solution:\n```python\n{program}\n```\n"


def test_probe_works_and_reports_isolation():
    assert ISO["works"], ISO
    for key in ("mount_ns", "net_ns", "pid_ns", "user_ns", "separate_uid"):
        assert key in ISO


def test_runs_program_with_stdin_and_scrubbed_env_in_fresh_dir():
    os.environ["MSAPO_TEST_SECRET"] = "hunter2"
    try:
        prog = "import os, sys\nprint(input()[::-1])\nprint(sorted(os.listdir('.')))\nprint(dict(os.environ))"
        res = run_python(prog, stdin="abc\n", limits=FAST)
    finally:
        del os.environ["MSAPO_TEST_SECRET"]
    assert res.ok, (res.failure, res.stderr)
    lines = res.stdout.splitlines()
    assert lines[0] == "cba"
    assert lines[1] == "['prog.py']"
    assert "hunter2" not in res.stdout and "MSAPO_TEST_SECRET" not in res.stdout


@needs_ns
def test_cannot_read_etc_passwd_or_project_files():
    for path in ("/etc/passwd", os.path.abspath(__file__)):
        res = run_python(f"print(open({path!r}).read())", limits=FAST)
        assert not res.ok and "root:" not in res.stdout and "hostile" not in res.stdout, path
        assert "FileNotFoundError" in res.stderr or "PermissionError" in res.stderr
    passwd = _as_code("print(open('/etc/passwd').read())")
    with open("/etc/passwd") as f:
        tests = [{"input": "", "output": f.read()}]
    assert compute_reward("code", passwd, {"tests": tests}) == 0.0


@needs_ns
def test_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "pwned"
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the isolation can stop it
    res = run_python(f"open({str(target)!r}, 'w').write('x')\nprint('wrote')", limits=FAST)
    assert not res.ok and "wrote" not in res.stdout
    assert not target.exists()


@needs_ns
def test_no_network_even_to_localhost():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        res = run_python(prog, limits=FAST)
        assert not res.ok and "connected" not in res.stdout
        with pytest.raises(socket.timeout):
            server.accept()  # nobody came
        tests = [{"input": "", "output": "connected"}]
        assert compute_reward("code", _as_code(prog), {"tests": tests}) == 0.0
    finally:
        server.close()


def test_fork_bomb_is_contained_and_cleaned_up():
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    res = run_python(prog, limits=FAST)
    assert not res.ok
    assert time.monotonic() - start < FAST.wall_s + 5
    if os.geteuid() == 0:
        assert _sandbox_procs() == []


def test_process_count_is_limited():
    prog = (
        "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n    n += 1\nprint(n)"
    )
    res = run_python(prog, limits=FAST)
    assert res.ok, (res.failure, res.stderr)
    assert 0 < int(res.stdout) < FAST.nproc  # the program itself counts too


def test_huge_allocation_fails_fast():
    res = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", limits=FAST)
    assert not res.ok and "allocated" not in res.stdout
    assert "MemoryError" in res.stderr
    assert res.wall_s < FAST.wall_s


def test_infinite_loop_hits_cpu_limit():
    start = time.monotonic()
    res = run_python("while True:\n    pass", limits=FAST)
    assert not res.ok and res.failure in ("cpu-time limit", "wall-time limit")
    assert time.monotonic() - start < FAST.wall_s + 3
    tests = [{"input": "", "output": ""}] * 3
    t0 = time.monotonic()
    assert compute_reward("code", _as_code("while True:\n    pass"), {"tests": tests, "time_limit_s": 0.5}) == 0.0
    assert time.monotonic() - t0 < 3  # after the first timeout the other tests are not run


def test_sleeping_program_hits_wall_limit():
    res = run_python("import time\ntime.sleep(60)", limits=FAST)
    assert res.timed_out and res.failure == "wall-time limit" and not res.ok


def test_huge_file_and_huge_output_are_cut():
    res = run_python("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 1048576)", limits=FAST)
    assert not res.ok and "File too large" in res.stderr
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)", limits=FAST)
    assert not res.ok
    assert len(res.stdout) <= FAST.file_mb * 1024 * 1024


@needs_ns
def test_total_disk_use_is_bounded():
    prog = "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 1048576)\n    i += 1"
    res = run_python(prog, limits=FAST)
    assert not res.ok and "No space left" in res.stderr


def test_fallback_without_namespaces_still_limits():
    limits = SandboxLimits(cpu_s=1, wall_s=1.5, memory_mb=256, nproc=8, namespaces=False)
    ok = run_python("print(6 * 7)", limits=limits)
    assert ok.ok and ok.stdout.strip() == "42", (ok.failure, ok.stderr)
    assert ok.isolation["mount_ns"] is False and ok.isolation["net_ns"] is False
    assert ok.isolation["separate_uid"] is (os.geteuid() == 0)
    loop = run_python("while True:\n    pass", limits=limits)
    assert not loop.ok and loop.failure in ("cpu-time limit", "wall-time limit")
    mem = run_python("x = bytearray(10 * 1024**3)", limits=limits)
    assert not mem.ok and "MemoryError" in mem.stderr
    if os.geteuid() == 0:
        escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('parent done')"
        assert run_python(escape, limits=limits).ok
        assert _sandbox_procs() == []  # the setsid'd child was killed with the rest of its uid


def test_concurrent_runs_from_threads():
    prog = "import sys\nn = int(sys.stdin.read())\nprint(n * n)"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: run_python(prog, stdin=str(n), limits=FAST), range(8)))
    assert [r.stdout.strip() for r in results] == [str(n * n) for n in range(8)]
