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


def test_two_rank_trainer_with_a_launched_server(tmp_path, kit_python):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", "examples/tiny_moe_cpu.yaml",
           "parallel.dp=2", "train.micro_batch_size=4", "train.steps=2", f"run.dir={run}", "logging.plots=false",
           "rollout.engine=sglang", f"rollout.sglang.python={kit_python}", "rollout.sglang.base_port=31400",
           "rollout.sglang.max_total_tokens=4096", "rollout.max_new_tokens=6"]  # fmt: skip
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
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == [1, 2] and [r["weight_version"] for r in rows] == [1, 2]
    for r in rows:  # the served weights after each sync are the trainer's
        assert r["sync/logprob_abs_diff_max"] < 1e-3 and r["kl_rollout_k3"] < 1e-4
