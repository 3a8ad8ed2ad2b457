"""Benchmark: cost of the router diagnostics (megatron_sapo/diagnostics/router.py) in a training step.

    python tools/bench_router_diagnostics.py [--seqs 32 --max-sequences 8 --every 10 --repeats 3]

One process, real megatron-core, a tiny MoE. A step is what the trainer does after the rollout: the
old-log-prob pass, then `--minibatches` optimizer steps. A diagnostic step additionally records the routing
in the old-log-prob pass and in every training forward, runs the per-mini-batch decomposition of updates
1.. (RouterStep: one forward-only pass with pi_old's routing replayed, on max_sequences / minibatches
sequences of that mini-batch; the training forward gives the rest) and the whole-step one
(run_router_diagnostics: two passes on `--max-sequences` sequences). Steps alternate plain / diagnostic; on
CPU the time is this process's CPU time with one thread (robust to other load on a shared machine), on GPU
wall time; the median of the repeats is used. With the
diagnostics every `--every` steps the mean step time over plain is

    ratio = ((every - 1) * t_plain + t_diag) / (every * t_plain)

Prints the timings, then `<figure> ratio=<value> goal<=1.03` lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from _bench_common import bench_clock, bench_moe_config, machine_label  # noqa: E402 (tools/ is this script's folder)

warnings.filterwarnings("ignore")


def _config(args):
    cfg = bench_moe_config(args, heads=4)
    cfg.algo.minibatches = args.minibatches
    cfg.diagnostics.max_sequences = args.max_sequences
    cfg.optim.lr = 1e-4
    return cfg


def _batch(args):
    g = torch.Generator().manual_seed(0)
    n, s = args.seqs, args.seq + 1
    tokens = torch.randint(1, args.vocab, (n, s), generator=g)
    mask = torch.zeros(n, s - 1)
    for i in range(n):
        prompt = 8 + i % 8
        mask[i, prompt : prompt + (s - 1 - prompt) * (2 + i % 3) // 4] = 1.0
    return {"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(n, generator=g)}


def _step(engine, batch, minibatches, diagnose: bool) -> tuple[float, float]:
    """(step time, of which diagnostics) for one trainer-like step."""
    from megatron_sapo.data.collate import minibatches as split
    from megatron_sapo.diagnostics.router import RouterStep, run_router_diagnostics

    start = bench_clock()
    batch = dict(batch)
    extra = 0.0
    if diagnose:  # as Trainer.train_step at a diagnostic step
        batch["old_log_probs"], old = engine.compute_log_probs(batch, record_routing=True)
        mark = bench_clock()
        router = RouterStep(engine, batch, old, "none", None)
        extra += bench_clock() - mark
    else:
        batch["old_log_probs"] = engine.compute_log_probs(batch)
    for k, mb in enumerate(split(batch, minibatches)):
        if not diagnose:
            engine.train_minibatch(mb)
            continue
        mark = bench_clock()
        router.before_update(k, mb)
        extra += bench_clock() - mark
        _, routing = engine.train_minibatch(mb, record_routing=True)
        mark = bench_clock()
        router.after_update(k, mb, routing)
        extra += bench_clock() - mark
    if diagnose:
        mark = bench_clock()
        metrics = {**run_router_diagnostics(engine, batch, old), **router.metrics()}
        assert "router/var_logratio" in metrics and "router/minibatch3/share" in metrics
        extra += bench_clock() - mark
    return bench_clock() - start, extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--max-sequences", type=int, default=8)
    p.add_argument("--every", type=int, default=10, help="diagnostics.router_every being evaluated")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from megatron_sapo.megatron import compat
    from megatron_sapo.megatron.engine import MegatronEngine

    if not torch.cuda.is_available():
        compat.apply_patches()
        torch.set_num_threads(1)
    engine = MegatronEngine(_config(args))
    batch = _batch(args)
    _step(engine, batch, args.minibatches, True)  # warm-up
    plain, diag, extra = [], [], []
    for _ in range(args.repeats):
        plain.append(_step(engine, batch, args.minibatches, False)[0])
        total, cost = _step(engine, batch, args.minibatches, True)
        diag.append(total)
        extra.append(cost)
    engine.shutdown()
    t_plain, t_diag, t_extra = (statistics.median(x) for x in (plain, diag, extra))
    ratio = ((args.every - 1) * t_plain + t_diag) / (args.every * t_plain)
    clock = "wall" if torch.cuda.is_available() else "CPU (1 thread)"
    print(f"machine: {machine_label()}")
    print(f"{args.seqs} sequences x {args.seq} tokens, {args.minibatches} mini-batches, diagnostics on "
          f"{min(args.seqs, args.max_sequences)} sequences; {clock} seconds, median of {args.repeats}")  # fmt: skip
    print(f"  step without diagnostics   {t_plain:.3f} s")
    print(f"  step with diagnostics      {t_diag:.3f} s  (of which the diagnostic passes {t_extra:.3f} s)")
    print(f"  one diagnostic step costs {t_diag / t_plain:.2f} plain steps")
    print(f"router_diagnostics_every_{args.every} ratio={ratio:.4f} goal<=1.03")
    return 0


if __name__ == "__main__":
    sys.exit(main())
