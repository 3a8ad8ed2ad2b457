"""Resume at another expert-parallel layout without the distributed optimizer: EP1 -> EP2xDP2 -> EP1. The
optimizer splits into dense + expert sub-optimizers only when EP > 1; the checkpoint's Adam state must still
load (by global parameter keys) and the run continue as if never interrupted."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EP2 = ["parallel.ep=2", "parallel.dp=2", "train.micro_batch_size=4"]


def _train(run_dir, steps: int, *overrides):
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", os.path.join(ROOT, "examples", "tiny_moe_cpu.yaml"),
           f"train.steps={steps}", "checkpoint.every=1", f"run.dir={run_dir}", "logging.plots=false",
           "logging.progress=false", "rollout.max_new_tokens=6", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _metrics(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f)}


def test_resume_across_expert_parallel_sizes_keeps_the_optimizer_state(tmp_path):
    straight, hopping = str(tmp_path / "straight"), str(tmp_path / "hopping")
    _train(straight, 3)
    _train(hopping, 1)
    assert "resumed from" in _train(hopping, 2, *EP2)  # saved by one optimizer, loaded by a dense + expert chain
    assert "resumed from" in _train(hopping, 3)  # and back
    want, got = _metrics(straight), _metrics(hopping)
    assert sorted(got) == [1, 2, 3]
    for step in (2, 3):
        # step 3's loss follows step 2's update, which used the resumed Adam moments: fresh moments (a lost
        # optimizer state) change it far beyond float32 layout noise
        for key in ("loss", "grad_norm", "reward_mean"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_context_parallel_run_matches_and_resumes_at_cp1(tmp_path):
    """The trainer at CP2 (two processes sharing each sequence): step 1 equals the single-process run, and its
    checkpoint resumes at CP1 for steps 2-3 as if never interrupted. Without the load-balancing loss, which
    megatron computes over every input position (CP rounds the length up to a multiple of 2 * cp)."""
    no_aux = ["model.moe_router_load_balancing=none"]
    straight, hopping = str(tmp_path / "straight"), str(tmp_path / "hopping")
    _train(straight, 3, *no_aux)
    _train(hopping, 1, "parallel.cp=2", *no_aux)
    assert "resumed from" in _train(hopping, 3, *no_aux)
    want, got = _metrics(straight), _metrics(hopping)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm", "reward_mean", "ratio_std"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)
