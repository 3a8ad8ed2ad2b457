"""The trainer end to end with a real SGLang server it launches, at two ranks (torchrun relaunch): the
server must not inherit the trainer's torch.distributed world, rank 0 alone gathers and syncs the weights,
and every step's post-sync check holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.sglang.conftest import REPO


def _train(cmd: list[str], tmp_path, run) -> list[dict]:
    """Run the trainer command (its own session, killed as a group if it hangs); its metrics rows."""
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=480)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"the run hung; log tail:\n{log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def test_two_rank_trainer_with_a_launched_server(tmp_path, kit_python):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", "examples/tiny_moe_cpu.yaml",
           "parallel.dp=2", "train.micro_batch_size=4", "train.steps=2", f"run.dir={run}", "logging.plots=false",
           "rollout.engine=sglang", f"rollout.sglang.python={kit_python}", "rollout.sglang.base_port=31400",
           "rollout.sglang.max_total_tokens=4096", "rollout.max_new_tokens=6"]  # fmt: skip
    rows = _train(cmd, tmp_path, run)
    assert [r["step"] for r in rows] == [1, 2] and [r["weight_version"] for r in rows] == [1, 2]
    for r in rows:  # the served weights after each sync are the trainer's
        assert r["sync/logprob_abs_diff_max"] < 1e-3 and r["kl_rollout_k3"] < 1e-4


def test_async_rollouts_with_a_launched_server(tmp_path, kit_python):
    """rollout.async_steps=1 with a real server: the rollout ahead runs in the trainer's thread pool while it
    trains (HTTP from that thread), each sync waits for it, and the served weights after every sync are the
    trainer's; the samples trained on at steps 2.. come from the weights one version back."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", "examples/tiny_moe_cpu.yaml", "rollout.async_steps=1",
           "train.steps=3", f"run.dir={run}", "logging.plots=false", "rollout.engine=sglang",
           f"rollout.sglang.python={kit_python}", "rollout.sglang.base_port=31500",
           "rollout.sglang.max_total_tokens=4096", "rollout.max_new_tokens=6"]  # fmt: skip
    rows = _train(cmd, tmp_path, run)
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert [r["rollout_staleness"] for r in rows] == [0, 1, 1]
    assert all(r["sync/logprob_abs_diff_max"] < 1e-3 for r in rows)
    assert rows[0]["kl_rollout_k3"] < 1e-4  # step 1 is on-policy; later steps see one update of lag
