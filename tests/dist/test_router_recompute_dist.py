"""Routing replay with activation recompute under PP2's 1F1B schedule (tests/dist/router_recompute_worker.py,
one 2-process torchrun launch): the recomputed router calls must get their own micro-batch's routing, not
the micro-batch whose forward ran last."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("router_recompute_worker.py")


def test_pp2_recompute_replays_each_micro_batchs_routing(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    res = torch.load(tmp_path / "recompute.pt", weights_only=False)
    assert res["tcfg"] == "full"
    mask = torch.zeros_like(res["forced"][..., 0, 0], dtype=torch.bool)
    mask[:, 3:] = True
    assert torch.equal(res["used"][mask], res["forced"][mask]) and torch.equal(res["used"], res["ref_used"])
    assert res["loss"] == res["ref_loss"]
    for rank, (diff, scale, recomputed, ref_recomputed) in enumerate(res["per_rank"].tolist()):
        # one MoE layer per stage, 8 micro-batches: 8 recomputed router calls per rank, none without recompute
        assert recomputed == 8 and ref_recomputed == 0, rank
        assert scale > 0 and diff == 0.0, (rank, diff, scale)
