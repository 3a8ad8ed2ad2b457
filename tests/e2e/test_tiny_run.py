"""The README's main job, shortened: a tiny SAPO run end to end, then resume equals an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "tiny_moe_cpu.yaml")
CONTRACT_KEYS = {
    "step", "loss", "grad_norm", "reward_mean", "response_len_mean", "ratio_mean", "ratio_std", "gate_mean",
    "kl_rollout_k3", "tokens_per_s", "time_rollout_s", "time_train_s", "time_sync_s", "weight_version",
}  # fmt: skip


def _train(*overrides, expect_rc=0):
    # fp32 as on CPU also on a GPU ("auto" is bf16 there): the trainer then matches the fp32 rollout engine
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", CONFIG, "model.dtype=fp32", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tiny_run_writes_contract_metrics_and_resumes_exactly(tmp_path):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    proc = _train("train.steps=3", "checkpoint.every=1", f"run.dir={straight}")
    assert "step 3 |" in proc.stdout
    rows = _metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) >= CONTRACT_KEYS, CONTRACT_KEYS - set(row)
    # on-policy first mini-batch: ratio 1 up to float rounding, which can flip a near-tied MoE routing when
    # the padded length differs between passes (exact under routing replay); trainer and rollout agree
    assert all(r["minibatch0/ratio_std"] < 1e-3 for r in rows)
    assert all(r["mismatch_abs_mean"] < 1e-4 for r in rows)
    assert os.path.exists(os.path.join(straight, "config.yaml"))
    with open(os.path.join(straight, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_3"

    _train("train.steps=2", f"run.dir={interrupted}")
    proc = _train("train.steps=3", f"run.dir={interrupted}")
    assert "resumed from" in proc.stdout and "step_2" in proc.stdout
    resumed = _metrics(interrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward_mean", "loss", "grad_norm", "ratio_std", "response_len_mean"):
        assert resumed[2][key] == rows[2][key], key  # bitwise on CPU


def test_bad_override_exits_with_one_clear_line():
    proc = _train("parallel.tp=3", expect_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'parallel.tp'" in lines[0] and "divisible by tp=3" in lines[0]
    proc = _train("algo.tau_nge=1.1", expect_rc=2)
    assert "did you mean 'algo.tau_neg'" in proc.stderr


@pytest.mark.slow
def test_async_rollouts_at_two_ranks(tmp_path):
    """rollout.async_steps=1 at dp=2 (rank 0's rollout thread beside both ranks' collectives): from step 2 on
    the samples come from the weights one version back, which shows as train/rollout mismatch far above float
    noise, while mini-batch 0 stays on-policy against the trainer's own old log-probs."""
    run = str(tmp_path / "run")
    _train("parallel.dp=2", "train.micro_batch_size=4", "rollout.async_steps=1", "train.steps=3",
           "rollout.max_new_tokens=6", f"run.dir={run}", "logging.plots=false")  # fmt: skip
    rows = _metrics(run)
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert [r["rollout_staleness"] for r in rows] == [0, 1, 1]
    assert rows[0]["mismatch_abs_mean"] < 1e-4  # generated on the trainer's current weights
    assert all(r["mismatch_abs_mean"] > 1e-3 for r in rows[1:])  # one optimizer step (4 updates) behind
    assert all(r["minibatch0/ratio_std"] < 1e-3 for r in rows)
