"""Routing replay with activation recompute under a real pipeline schedule: 2 processes, PP2, 8 micro-batches
(1F1B: stage 0 runs the forward of micro-batch i+1 before the backward, and so the recompute, of i). Launched
by tests/dist/test_router_recompute_dist.py; rank 0 writes OUT/recompute.pt."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from megatron_sapo.config import Config  # noqa: E402
from megatron_sapo.megatron import compat  # noqa: E402
from megatron_sapo.megatron.engine import MegatronEngine  # noqa: E402
from megatron_sapo.megatron.parallel import init_torch_distributed  # noqa: E402
from megatron_sapo.megatron.routing import REPLAY_KEY  # noqa: E402


def make_config(granularity: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.num_experts, m.moe_topk, m.moe_router_load_balancing = 2, 4, 2, "none"
    m.recompute_granularity, m.recompute_method, m.recompute_num_layers = granularity, "uniform", 1
    cfg.parallel.pp, cfg.train.micro_batch_size = 2, 1
    return cfg


def make_batch(n: int = 8, s: int = 24) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 512, (n, s), generator=g)
    mask = torch.zeros(n, s - 1)
    mask[:, 3:] = 1.0
    return {"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(n, generator=g)}


def run(granularity: str) -> dict:
    eng = MegatronEngine(make_config(granularity))
    try:
        batch = make_batch()
        lp, old = eng.compute_log_probs(batch, record_routing=True)
        batch["old_log_probs"] = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
        # each sequence replays another sequence's routing: far from what its own tokens would choose
        forced = torch.roll(old["ids"], 1, dims=0)
        metrics, used = eng.forward_backward(dict(batch, **{REPLAY_KEY: forced}), record_routing=True)
        grads = {n: p.main_grad.clone() for m in eng.model for n, p in m.named_parameters()}
        return {"loss": metrics["loss"], "forced": forced, "used": used["ids"], "grads": grads,
                "recomputed": eng.routing.recomputed, "tcfg": eng.tcfg.recompute_granularity}  # fmt: skip
    finally:
        eng.shutdown()


def main() -> None:
    compat.apply_patches()
    init_torch_distributed()
    ref, got = run("none"), run("full")
    grad_diff = max(float((got["grads"][k] - r).abs().max()) for k, r in ref["grads"].items())
    grad_scale = max(float(r.abs().max()) for r in ref["grads"].values())
    stats = torch.tensor([grad_diff, grad_scale, float(got["recomputed"]), float(ref["recomputed"])])
    parts = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stats)
    if dist.get_rank() == 0:
        out = {k: got[k] for k in ("forced", "used", "tcfg")}
        out.update(loss=got["loss"], ref_loss=ref["loss"], ref_used=ref["used"], per_rank=torch.stack(parts))
        torch.save(out, os.path.join(sys.argv[1], "recompute.pt"))
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
