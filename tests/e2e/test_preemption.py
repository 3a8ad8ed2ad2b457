"""SIGUSR1 / SIGTERM (SLURM's time-limit warning, preemption): the trainer finishes its step, writes a complete
checkpoint of it, exits with preemption.EXIT_CODE, and the same command resumes to the uninterrupted run's
per-step metrics (bitwise on CPU)."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_sapo.preemption import EXIT_CODE
from tests.e2e.test_resume_kill import COMPARED, ROOT, _metrics

STEPS = 3
EXIT_BOUND_S = 120  # from the signal to the exit: the rest of one step plus one checkpoint write


def _cmd(run_dir, *overrides):
    # one thread everywhere: rollout.local_process would otherwise halve the trainer's threads, and another
    # reduction order changes the float rounding of the compared metrics
    return [
        sys.executable, "-m", "megatron_sapo.cli", "train", os.path.join(ROOT, "examples", "tiny_moe_cpu.yaml"),
        f"train.steps={STEPS}", "checkpoint.every=0", "rollout.max_new_tokens=6", f"run.dir={run_dir}",
        "logging.plots=false", "parallel.cpu_threads=1", *overrides,
    ]  # fmt: skip


def _steps_written(run_dir) -> int:
    try:
        return len(_metrics(run_dir))
    except (FileNotFoundError, ValueError):  # not there yet, or a line being written
        return 0


def _run(run_dir, *overrides, signum=None):
    """Train in its own process group (output to a file). With `signum`: once the metrics show step 1, send it to
    the whole group, as SLURM signals every process of a job step. Returns (exit code, seconds from the signal
    to the exit, output)."""
    log = os.path.join(os.path.dirname(run_dir), f"train-{os.path.basename(run_dir)}.log")
    waited = None
    with open(log, "a") as out:
        proc = subprocess.Popen(_cmd(run_dir, *overrides), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
        try:
            if signum is not None:
                deadline = time.monotonic() + 600
                while _steps_written(run_dir) < 1 and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert proc.poll() is None, "the run ended before step 1 was written"
                os.killpg(proc.pid, signum)
                start = time.monotonic()
                returncode = proc.wait(timeout=EXIT_BOUND_S)
                waited = time.monotonic() - start
            else:
                returncode = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    with open(log) as f:
        return returncode, waited, f.read()


def _checkpoints(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        latest = f.read().strip()
    complete = sorted(n for n in os.listdir(root) if os.path.exists(os.path.join(root, n, "COMPLETE")))
    return latest, complete


@pytest.mark.slow
def test_a_signal_checkpoints_the_step_exits_and_resumes_to_the_same_trajectory(tmp_path):
    straight = str(tmp_path / "straight")
    rc, _, out = _run(straight)
    assert rc == 0, out[-2000:]
    expected = _metrics(straight)
    assert [m["step"] for m in expected] == list(range(1, STEPS + 1))

    # SIGUSR1 with no periodic checkpoint: the stop writes one. SIGTERM with one every step: the stop reuses it.
    # SIGTERM again with the local engine in its own process (rollout.local_process): the signal reaches that
    # child too (which ignores it: tests/unit/test_local_process.py); its samples equal the in-process engine's,
    # so the stopped and resumed run follows the same trajectory.
    cases = ((signal.SIGUSR1, 0, ()), (signal.SIGTERM, 1, ()), (signal.SIGTERM, 1, ("rollout.local_process=true",)))
    for signum, every, extra in cases:
        run_dir = str(tmp_path / (signal.Signals(signum).name + "".join(extra)))
        rc, waited, out = _run(run_dir, f"checkpoint.every={every}", *extra, signum=signum)
        assert rc == EXIT_CODE, out[-2000:]
        assert waited < EXIT_BOUND_S
        stopped = len(_metrics(run_dir))
        assert 1 <= stopped < STEPS, out[-2000:]  # the last step runs to its end, no further one starts
        assert f"stopped by {signal.Signals(signum).name} at step {stopped} (checkpoint complete)" in out
        assert [m["step"] for m in _metrics(run_dir)] == list(range(1, stopped + 1))
        latest, complete = _checkpoints(run_dir)
        assert latest == f"step_{stopped}" and f"step_{stopped}" in complete

        rc, _, out = _run(run_dir, f"checkpoint.every={every}", *extra)
        assert rc == 0, out[-2000:]
        assert f"step_{stopped} (step {stopped})" in out  # resumed from the signal's checkpoint
        got = _metrics(run_dir)
        assert [m["step"] for m in got] == list(range(1, STEPS + 1))
        for want, have in zip(expected, got):
            for key in COMPARED:
                assert have[key] == want[key], (signum, want["step"], key, have[key], want[key])
