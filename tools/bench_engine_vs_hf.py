"""Benchmark: the Megatron engine's training step and log-prob pass vs the same work on the HF model, CPU.

    python tools/bench_engine_vs_hf.py [--rows 8 --seq 24 --logprob-rows 32 --repeats 5 --iters 20]

Why: tools/bench_vs_trl.py compares whole RL steps with TRL. This isolates the part where the two differ,
the policy update, at the README's tiny recipe (examples/tiny_moe_cpu.yaml: hidden 64, 2 layers, 4 experts
top-2). Both sides hold the same weights (the engine's, exported with megatron_to_hf) and see the same tokens:
- train: MegatronEngine.train_minibatch (megatron-core GPTModel, MoE layers, schedule, DDP, optimizer, clip,
  the SAPO loss through loss_glue) vs the HF Qwen3-MoE forward with its router aux loss (the same coefficient),
  log-softmax + gather, the same compute_policy_loss, backward, clip_grad_norm_ and torch AdamW.
- logprobs: MegatronEngine.compute_log_probs on `--logprob-rows` rows vs the HF forward + log-softmax + gather
  under no_grad.
Time is this process's CPU time with one intra-op thread (tools/_bench_common.bench_clock); runs alternate,
the headline takes each side's fastest run. Prints `<figure> ratio=<megatron / hf time> goal<=1.0`: above 1
means the HF model does the same step faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from _bench_common import bench_clock  # noqa: E402 (tools/ is this script's folder)

warnings.filterwarnings("ignore")


def build(args):
    from megatron_sapo.algo import compute_policy_loss
    from megatron_sapo.config import load_config
    from megatron_sapo.megatron.engine import MegatronEngine
    from megatron_sapo.rollout.local import LocalEngine
    from megatron_sapo.rollout.weights import megatron_to_hf

    cfg = load_config(os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"), ["parallel.cpu_threads=1"])
    engine = MegatronEngine(cfg)
    local = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    local.update_weights(megatron_to_hf(engine.global_state_dict(), cfg.model), version=0)  # every weight, checked
    hf = local.model.train()
    o, spec = cfg.optim, engine.loss_spec  # the engine's own loss name, aggregation and hyperparameters
    adamw = torch.optim.AdamW(hf.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                              weight_decay=o.weight_decay)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.model.vocab_size, (args.rows, args.seq), generator=gen)
    batch = {
        "tokens": tokens,
        "loss_mask": torch.ones(args.rows, args.seq - 1),
        "rollout_log_probs": torch.full((args.rows, args.seq - 1), -1.0),
        "old_log_probs": torch.full((args.rows, args.seq - 1), -1.0),
        "advantages": torch.randn(args.rows, generator=gen),
    }
    wide = {k: v.repeat(args.logprob_rows // args.rows, *[1] * (v.dim() - 1)) for k, v in batch.items()}
    coef = 0.0 if cfg.model.moe_router_load_balancing == "none" else cfg.model.moe_aux_loss_coeff

    def token_log_probs(tokens, **kwargs):
        out = hf(input_ids=tokens, **kwargs)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return logp, out

    def hf_train():
        logp, out = token_log_probs(tokens, output_router_logits=coef > 0)
        loss, _ = compute_policy_loss(spec.name, logp, batch["old_log_probs"], batch["advantages"], batch["loss_mask"],
                                      agg=spec.agg, **spec.hyper)  # fmt: skip
        (loss + coef * out.aux_loss if coef else loss).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_grad)
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    def hf_logprobs():
        with torch.no_grad():
            token_log_probs(wide["tokens"])

    sides = {
        "train": (lambda: engine.train_minibatch(batch), hf_train),
        "logprobs": (lambda: engine.compute_log_probs(wide), hf_logprobs),
    }
    return engine, sides


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    start = bench_clock()
    for _ in range(iters):
        fn()
    return (bench_clock() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="rows of a training mini-batch (the tiny recipe: 8)")
    parser.add_argument("--seq", type=int, default=24, help="tokens per row (prompt + response)")
    parser.add_argument("--logprob-rows", type=int, default=32, help="rows of the old-log-prob pass (a multiple)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine, sides = build(args)
    best = {name: [float("inf"), float("inf")] for name in sides}
    for _ in range(args.repeats):
        for name, fns in sides.items():
            for i, fn in enumerate(fns):
                best[name][i] = min(best[name][i], timed(fn, args.iters))
    engine.shutdown()
    print(f"machine: {platform.machine()} CPU, torch {torch.__version__}, 1 thread; examples/tiny_moe_cpu.yaml; "
          f"train {args.rows} x {args.seq} tokens, logprobs {args.logprob_rows} rows; fastest of {args.repeats} "
          f"runs x {args.iters} iterations, CPU ms")  # fmt: skip
    print(f"{'figure':<10} {'megatron ms':>12} {'hf ms':>8}")
    for name, (ours, theirs) in best.items():
        print(f"{name:<10} {ours * 1e3:>12.2f} {theirs * 1e3:>8.2f}")
    for name, (ours, theirs) in best.items():
        # goal: megatron-core's engine should cost no more than an eager HF model for the same step
        print(f"{name}_megatron_vs_hf_time ratio={ours / theirs:.3f} goal<=1.0")


if __name__ == "__main__":
    main()
