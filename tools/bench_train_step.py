"""Benchmark: SAPO train step vs bare Megatron forward-backward, and the log-prob peak memory.

    python tools/bench_train_step.py [--hidden 256 --layers 2 --vocab 8192 --seq 128 --seqs 8 --repeats 7]

1. Step time. One process, real megatron-core (local spec on CPU, TE spec on GPU). The SAPO side is
   MegatronEngine.forward_backward (vocab-parallel log-probs + entropy + compute_policy_loss + metric
   reduction); the bare side runs the same model, micro-batches and schedule with megatron's own
   cross-entropy (GPTModel(labels=...) -> vocab_parallel_cross_entropy) and a masked mean. The optimizer
   step is left out of both (it is the same work). Runs alternate; on CPU the time is this process's CPU
   time with one thread (robust to other load on a shared machine), on GPU wall time. The headline
   compares the fastest run of each side; the medians are printed too.
2. Peak memory of per-token log-probs + entropy, forward and backward, above the logits already in
   memory, divided by the logits' size; each method runs in a fresh subprocess (peak RSS, with glibc's
   mmap threshold pinned so freed blocks go back to the OS). The logits come from a linear layer, as in the
   model, so the gradient buffer of the logits is part of what is measured.

Prints a table, then one line per figure: `<figure> ratio=<value> goal<op><threshold>`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from _bench_common import bench_clock, bench_moe_config, machine_label  # noqa: E402 (tools/ is this script's folder)

warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------------------------
# 1. step time
# ----------------------------------------------------------------------------------------------------------
def _config(args):
    return bench_moe_config(args, heads=8)


def _batch(args, engine):
    g = torch.Generator().manual_seed(0)
    n, s = args.seqs, args.seq + 1
    tokens = torch.randint(1, args.vocab, (n, s), generator=g)
    mask = torch.zeros(n, s - 1)
    mask[:, s // 4 :] = 1.0  # a quarter prompt, the rest response: every position is computed
    batch = {"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(n, generator=g)}
    batch["old_log_probs"] = engine.compute_log_probs(batch) + 0.05 * torch.randn(n, s - 1, generator=g) * mask
    return batch


def _ce_loss_func(mask, output_tensor):
    # GPTModel(labels=...) returns megatron's per-token cross-entropy [b, s]
    loss = (output_tensor.float() * mask).sum() / mask.sum()
    return loss, {"loss": loss.detach()}


def _ce_forward_step(data_iterator, model):
    from megatron_sapo.megatron import compat, loss_glue

    mb = loss_glue.to_device(next(data_iterator))  # as the engine's forward step: GPU tensors on a GPU
    with compat.device_args_suspended():  # as the engine's forward step: the same CPU shim on both sides
        out = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
    return out, functools.partial(_ce_loss_func, mb["loss_mask"])


def _bare_forward_backward(engine, batch):
    from megatron_sapo.megatron import loss_glue

    length = engine._length(batch)
    mbs = loss_glue.make_microbatches(batch, engine.cfg.train.micro_batch_size, length)
    for m in engine.model:
        m.zero_grad_buffer()
    heads = {}
    for chunk in engine.model:  # megatron's own cross-entropy: take the engine's LogProbHead off
        module = chunk.module
        if "compute_language_model_loss" in vars(module):
            heads[module] = vars(module).pop("compute_language_model_loss")
    try:
        engine._run(_ce_forward_step, mbs, length, forward_only=False)
    finally:
        for module, head in heads.items():
            module.compute_language_model_loss = head


def _timed(fn) -> float:
    """Seconds of fn by bench_clock (CPU time with one intra-op thread on CPU, see bench_step)."""
    start = bench_clock()
    fn()
    return bench_clock() - start


def bench_step(args) -> dict:
    from megatron_sapo.megatron.engine import MegatronEngine

    engine = MegatronEngine(_config(args))
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # CPU time == work, no spinning pool threads
    batch = _batch(args, engine)
    sides = {"sapo": lambda: engine.forward_backward(batch), "bare_ce": lambda: _bare_forward_backward(engine, batch)}
    times = {name: [] for name in sides}
    for i in range(args.warmup + args.repeats):
        for name, fn in sides.items():  # alternate, so drift hits both sides alike
            t = _timed(fn)
            if i >= args.warmup:
                times[name].append(t)
    engine.shutdown()
    return {"min": {k: min(v) for k, v in times.items()}, "median": {k: statistics.median(v) for k, v in times.items()},
            "all": times}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 2. log-prob peak memory (each method in its own process)
# ----------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _logprob_method(name):
    from megatron_sapo.megatron.logprobs import vocab_parallel_log_probs

    def ours(logits, labels):
        return vocab_parallel_log_probs(logits, labels, None, with_entropy=True, inplace_backward=True)

    def naive(logits, labels):
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, labels[..., None]).squeeze(-1), entropy

    return {"ours": ours, "naive_log_softmax": naive}[name]


def memory_child(name: str, tokens: int, vocab: int, hidden: int) -> dict:
    torch.manual_seed(0)
    if torch.cuda.is_available():
        return _cuda_memory_child(name, tokens, vocab, hidden)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(hidden, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    fn = _logprob_method(name)
    logits = h @ w
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logp, entropy = fn(logits, labels)
    (logp.sum() + 0.1 * entropy.sum()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = max(peak - max(base, peak_before), 0)
    return {"method": name, "extra_bytes": extra, "logits_bytes": logits.numel() * logits.element_size()}


def _cuda_memory_child(name: str, tokens: int, vocab: int, hidden: int) -> dict:
    """On GPU the allocator's own peak counter, bf16 logits as in training (no RSS noise)."""
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    logits = h @ w
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logp, entropy = _logprob_method(name)(logits, labels)
    (logp.float().sum() + 0.1 * entropy.float().sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    return {"method": name, "extra_bytes": extra, "logits_bytes": logits.numel() * logits.element_size()}


def bench_memory(args) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(os.cpu_count() or 1))
    out = []
    for name in ("ours", "naive_log_softmax"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--mem-tokens", str(args.mem_tokens),
               "--vocab", str(args.mem_vocab), "--hidden", str(args.hidden)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--mem-tokens", type=int, default=2048)
    p.add_argument("--mem-vocab", type=int, default=32768)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.mem_tokens, args.mem_vocab, args.hidden)))
        return

    machine = machine_label()
    memory = bench_memory(args)
    step = bench_step(args)
    print(f"machine: {machine}")
    print(f"model: hidden {args.hidden}, layers {args.layers}, 8 experts top-2, vocab {args.vocab}; "
          f"{args.seqs} sequences x {args.seq} tokens, micro-batch {args.mbs}")  # fmt: skip
    clock = "wall" if torch.cuda.is_available() else "CPU (1 thread)"
    print(f"{'fwd+bwd':<10} {'min s':>8} {'median s':>9}  all runs ({clock} s)")
    for name in ("sapo", "bare_ce"):
        runs = [round(t, 4) for t in step["all"][name]]
        print(f"{name:<10} {step['min'][name]:>8.4f} {step['median'][name]:>9.4f}  {runs}")
    print(f"median ratio (noisier): {step['median']['sapo'] / step['median']['bare_ce']:.3f}")
    dtype = "bf16 logits, CUDA allocator peak" if torch.cuda.is_available() else "fp32 logits, peak RSS"
    print(f"log-probs+entropy fwd+bwd, {args.mem_tokens} tokens x vocab {args.mem_vocab} ({dtype}):")
    for row in memory:
        ratio, mib, extra = row["extra_bytes"] / row["logits_bytes"], row["logits_bytes"] / 2**20, row["extra_bytes"]
        print(f"  {row['method']:<18} extra peak {extra / 2**20:8.1f} MiB = {ratio:.3f} x logits ({mib:.1f} MiB)")
    ours = next(r for r in memory if r["method"] == "ours")
    print(f"sapo_step_overhead ratio={step['min']['sapo'] / step['min']['bare_ce']:.3f} goal<=1.05")
    print(f"logprob_peak_memory ratio={ours['extra_bytes'] / ours['logits_bytes']:.3f} goal<=1.25")


if __name__ == "__main__":
    main()
