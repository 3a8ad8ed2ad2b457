"""SIGKILL at any moment (mid-rollout, mid-update, mid-checkpoint write, or a random time) and resume: the
per-step metrics equal an uninterrupted run's, bitwise on CPU, and a half-written checkpoint is never loaded."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 5
COMPARED = ("reward_mean", "loss", "grad_norm", "ratio_mean", "ratio_std", "response_len_mean", "kl_rollout_k3")


def _cmd(run_dir, extra=()):
    return [
        sys.executable, "-m", "megatron_sapo.cli", "train", os.path.join(ROOT, "examples", "tiny_moe_cpu.yaml"),
        f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=2", "rollout.max_new_tokens=6",
        f"run.dir={run_dir}", "logging.plots=false", *extra,
    ]  # fmt: skip


class _Result:
    def __init__(self, returncode, stdout, left_behind):
        self.returncode, self.stdout, self.left_behind = returncode, stdout, left_behind


def _left_behind(pgid: int, wait_s: float = 15.0) -> list[str]:
    """Live (not zombie) processes of the trainer's group once it is dead, after giving its helpers wait_s to
    end: the rollout child ends when its pipe closes, megatron's forked writers when their file is written."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for p in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(p.info["cmdline"] or [])[:120])
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _run(run_dir, kill_at=None, kill_after_s=None, extra=()):
    """Run training in its own process group. Returns its exit code, output and the processes of the group that
    outlived the trainer; then, like a job scheduler, kills the whole group."""
    env = dict(os.environ)
    env.pop("MEGATRON_SAPO_KILL_AT", None)
    if kill_at:
        env["MEGATRON_SAPO_KILL_AT"] = kill_at
    log = os.path.join(os.path.dirname(run_dir), "train.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(_cmd(run_dir, extra), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
        try:
            if kill_after_s is not None:
                try:
                    proc.wait(timeout=kill_after_s)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            returncode = proc.wait(timeout=600)
            left_behind = _left_behind(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    with open(log) as f:
        return _Result(returncode, f.read(), left_behind)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_trajectory(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert _run(straight).returncode == 0
    expected = _metrics(straight)
    assert [m["step"] for m in expected] == list(range(1, STEPS + 1))

    for kill_at, resumes_after in (("rollout@2", None), ("update@3", 1), ("checkpoint@4", 2)):
        proc = _run(killed, kill_at)
        assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:]
        assert proc.left_behind == []  # no helper process outlives a killed trainer (megatron's Manager did)
        if resumes_after is not None:
            assert f"step_{resumes_after} (step {resumes_after})" in proc.stdout
    # the checkpoint@4 kill left step_4 written but unmarked: it must not be loaded
    assert os.path.isdir(os.path.join(killed, "checkpoints", "step_4"))
    assert not os.path.exists(os.path.join(killed, "checkpoints", "step_4", "COMPLETE"))

    # an external SIGKILL at a random moment of the next attempt
    delay = random.Random().uniform(2.0, 12.0)
    out = _run(killed, kill_after_s=delay).stdout
    assert "step_4 (step 4)" not in out, f"loaded the half-written checkpoint (kill after {delay:.1f} s)"

    final = _run(killed)
    assert final.returncode == 0, final.stdout[-2000:]
    got = _metrics(killed)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for want, have in zip(expected, got):
        for key in COMPARED:
            assert have[key] == want[key], (want["step"], key, have[key], want[key], f"random kill at {delay:.1f} s")


@pytest.mark.slow
def test_killed_async_run_resumes_with_its_rollout_ahead(tmp_path):
    """rollout.async_steps=1: step k+1's rollout is generated (and its prompts drawn) during step k and saved
    with step k's checkpoint. Killed in that rollout (inside the thread) or mid-update, the run resumes to the
    uninterrupted trajectory: nothing is generated twice and the samples stay one weight version old. The
    local engine generates in its own process here (rollout.local_process), which must end with the trainer."""
    extra = ("rollout.async_steps=1", "rollout.local_process=true")
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert _run(straight, extra=extra).returncode == 0
    expected = _metrics(straight)
    assert [m["rollout_staleness"] for m in expected] == [0] + [1] * (STEPS - 1)
    # rollout@4 is step 4's rollout, generated ahead while step 3 trains: the next attempt resumes after step 2
    for kill_at, resumes_after in (("rollout@4", None), ("update@4", 2)):
        proc = _run(killed, kill_at, extra=extra)
        assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:]
        assert proc.left_behind == [], proc.left_behind  # the rollout child saw its pipe close and ended
        if resumes_after is not None:
            assert f"step_{resumes_after} (step {resumes_after})" in proc.stdout
    final = _run(killed, extra=extra)
    assert final.returncode == 0, final.stdout[-2000:]
    assert "step_3 (step 3)" in final.stdout  # its checkpoint holds step 4's rollout, generated before the kill
    got = _metrics(killed)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for want, have in zip(expected, got):
        for key in (*COMPARED, "rollout_staleness"):
            assert have[key] == want[key], (want["step"], key, have[key], want[key])
