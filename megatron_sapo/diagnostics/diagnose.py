"""`megatron-sapo diagnose`: the router-variance decomposition between two checkpoints, without training.

    megatron-sapo diagnose CONFIG [overrides] --old CKPT_OLD [--new CKPT_NEW] [--batch FILE.pt] [--out FILE.json]

pi_old = CKPT_OLD (the routing and log-probs of the old-policy pass), pi_theta = CKPT_NEW (default: the
same checkpoint, which gives zero variance: a check). The batch is a torch file with tokens [N, S] and
loss_mask [N, S-1] (advantages [N] optional), or, without --batch, diagnostics.max_sequences random
sequences of the model's vocabulary (loss on their second half). With algo.routing_replay != none the
current policy replays pi_old's routing, as in training.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_sapo.config import ConfigError, InputError
from megatron_sapo.run_state import require_complete


def synthetic_batch(n: int, seq: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, seq), generator=g)
    mask = torch.zeros(n, seq - 1)
    mask[:, seq // 2 :] = 1.0
    return {"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(n, generator=g)}


def format_table(metrics: dict) -> str:
    lines = ["decomposition (loss tokens): l = l_route + l_weight"]
    for name in ("var_logratio", "var_route", "var_weight", "cov_route_weight", "share"):
        lines.append(f"  {name:<18} {metrics.get(f'router/{name}', float('nan')):.6g}")
    layers = sorted({int(k.split("/")[1][5:]) for k in metrics if k.startswith("router/layer")})
    cols = ("change_rate", "var_changed", "var_unchanged", "load_cv", "load_max_mean", "entropy")
    lines.append("layer " + " ".join(f"{c:>13}" for c in cols))
    for i in layers:
        lines.append(f"{i:>5} " + " ".join(f"{metrics.get(f'router/layer{i}/{c}', float('nan')):>13.6g}" for c in cols))
    return "\n".join(lines)


def diagnose(cfg, old: str, new: str | None = None, batch_path: str | None = None) -> dict:
    from megatron_sapo.diagnostics.router import run_router_diagnostics
    from megatron_sapo.megatron.engine import MegatronEngine

    if not cfg.model.is_moe:
        raise ConfigError("model.num_experts: diagnose needs an MoE model (num_experts > 0)")
    for flag, path in (("--old", old), ("--new", new)):
        if path:
            require_complete(path, f"diagnose {flag}")
    if batch_path and not os.path.isfile(batch_path):
        raise InputError(f"diagnose --batch {batch_path}: no such file")
    engine = MegatronEngine(cfg)
    try:
        if batch_path:
            batch = torch.load(batch_path, weights_only=True)
        else:
            seq = min(cfg.model.max_seq_len, 64)
            batch = synthetic_batch(max(cfg.diagnostics.max_sequences, 1), seq, cfg.model.vocab_size)
        batch.setdefault("advantages", torch.zeros(batch["tokens"].shape[0]))
        rows = batch["tokens"].shape[0] // (engine.par.dp * cfg.train.micro_batch_size)
        rows *= engine.par.dp * cfg.train.micro_batch_size
        if rows == 0:
            raise ValueError("the batch must hold at least dp * train.micro_batch_size sequences")
        batch = {k: v[:rows] for k, v in batch.items()}
        engine.load_checkpoint(old)
        batch["old_log_probs"], old_routing = engine.compute_log_probs(batch, record_routing=True)
        if new:
            engine.load_checkpoint(new)
        return run_router_diagnostics(engine, batch, old_routing, cfg.algo.routing_replay != "none")
    finally:
        engine.shutdown()


def cmd_diagnose(cfg, args) -> int:
    metrics = diagnose(cfg, args.old, args.new, args.batch)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(metrics))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(metrics, f, indent=1, sort_keys=True)
            print(f"saved {args.out}")
    return 0
