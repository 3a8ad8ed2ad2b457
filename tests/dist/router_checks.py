"""Routing capture / replay / router diagnostics across layouts, run inside tests/dist/worker.py's launches.

ref (1 process): routing of W0 on the batch, then the decomposition at perturbed weights W1 with free routing
and with W0's routing replayed (r2). multi (4 processes): the same at each ROUTER_LAYOUTS entry; the pytest
side (test_engine_dist.py) compares. Perturbed weights instead of an optimizer step: the comparison then
does not depend on how well optimizer steps agree across layouts (tested elsewhere).
"""

from __future__ import annotations

import torch

from megatron_sapo.diagnostics.router import run_router_diagnostics

ROUTER_LAYOUTS = {
    "tp2_sp_dp2": dict(tp=2, etp=2, sp=True, dp=2),
    "tp2_etp2_nosp_dp2": dict(tp=2, etp=2, dp=2),
    "ep2_dp4": dict(ep=2, dp=4),
    "pp2_dp2": dict(pp=2, dp=2),
    "tp2_ep2_sp": dict(tp=2, sp=True, ep=2, dp=2),
    "cp2_tp2_sp": dict(cp=2, tp=2, etp=2, sp=True),  # CP columns, then the SP shard of them
}


def perturbed(w0: dict, seed: int = 11, scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.float().std().nan_to_num() * torch.randn(v.shape, generator=g) for k, v in w0.items()}


def router_results(eng, batch: dict, w1: dict) -> dict:
    """Old routing at the engine's current weights (W0), then free and r2 diagnostics at W1."""
    lp, old = eng.compute_log_probs(batch, record_routing=True)
    b = dict(batch, old_log_probs=lp)
    eng.load_global_state_dict(w1)
    free = run_router_diagnostics(eng, b, old)
    r2 = run_router_diagnostics(eng, b, old, replay=True)
    out = {"ids": old["ids"], "probs": old["probs"], "free": free, "r2": r2}
    p = eng.cfg.parallel
    if p.tp == 1 or p.sp:  # megatron-core refuses to train an MoE with TP but without SP
        # the training forward's own record at W1 (free routing, then W0's replayed), no optimizer step
        _, train = eng.forward_backward(b, record_routing=True)
        _, train_r2 = eng.forward_backward(dict(b, replay_routing=old["ids"]), record_routing=True)
        out.update(train_ids=train["ids"], train_lp=train["log_probs"], train_r2_ids=train_r2["ids"])
    return out
