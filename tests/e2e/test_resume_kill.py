"""SIGKILL at any moment (mid-rollout, mid-update, mid-checkpoint write, or a random time) and resume: the
per-step metrics equal an uninterrupted run's, bitwise on CPU, and a half-written checkpoint is never loaded."""

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


def _cmd(run_dir):
    return [
        sys.executable, "-m", "megatron_sapo.cli", "train", os.path.join(ROOT, "examples", "tiny_moe_cpu.yaml"),
        f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=2", "rollout.max_new_tokens=6",
        f"run.dir={run_dir}", "logging.plots=false",
    ]  # fmt: skip


def _run(run_dir, kill_at=None):
    env = dict(os.environ)
    env.pop("MEGATRON_SAPO_KILL_AT", None)
    if kill_at:
        env["MEGATRON_SAPO_KILL_AT"] = kill_at
    return subprocess.run(_cmd(run_dir), env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)


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
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        if resumes_after is not None:
            assert f"step_{resumes_after} (step {resumes_after})" in proc.stdout
    # the checkpoint@4 kill left step_4 written but unmarked: it must not be loaded
    assert os.path.isdir(os.path.join(killed, "checkpoints", "step_4"))
    assert not os.path.exists(os.path.join(killed, "checkpoints", "step_4", "COMPLETE"))

    # an external SIGKILL at a random moment of the next attempt
    delay = random.Random().uniform(2.0, 12.0)
    proc = subprocess.Popen(_cmd(killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert "step_4 (step 4)" not in out, f"loaded the half-written checkpoint (kill after {delay:.1f} s)"

    final = _run(killed)
    assert final.returncode == 0, final.stderr[-2000:]
    got = _metrics(killed)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for want, have in zip(expected, got):
        for key in COMPARED:
            assert have[key] == want[key], (want["step"], key, have[key], want[key], f"random kill at {delay:.1f} s")
