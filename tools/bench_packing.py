"""Benchmark: a SAPO training pass (forward + backward) with and without sequence packing.

    python tools/bench_packing.py [--hidden 256 --layers 2 --vocab 8192 --seq 512 --seqs 16 --mbs 4 --repeats 5]

RL batches mix short and long responses: padded, every sequence costs the longest one's positions; packed
(train.pack_sequences), several sequences share a row under a block-diagonal causal mask. The batch here has
prompts of 32-64 tokens and response lengths drawn log-uniformly between 8 and the rest of --seq, as
RL responses are. Both sides run the same engine code on the same batch, alternating; the clock is CPU time
with one thread on CPU (robust to other load) and wall time on GPU. Prints the rows each side runs and
`packed_step_speedup ratio=<padded time / packed time>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _bench_common import bench_clock, bench_moe_config, machine_label  # noqa: E402 (tools/ is this script's folder)

warnings.filterwarnings("ignore")


def variable_length_batch(args) -> dict:
    g = torch.Generator().manual_seed(0)
    n, s = args.seqs, args.seq + 1
    tokens = torch.zeros(n, s, dtype=torch.long)
    mask = torch.zeros(n, s - 1)
    for i in range(n):
        prompt = int(torch.randint(32, 65, (1,), generator=g))
        longest = s - 1 - prompt
        response = int(torch.exp(torch.empty(1).uniform_(0, 1, generator=g) * torch.log(torch.tensor(longest / 8))) * 8)
        response = longest if i == 0 else max(8, min(response, longest))  # one spans --seq: the padded length
        tokens[i, : prompt + response] = torch.randint(1, args.vocab, (prompt + response,), generator=g)
        mask[i, prompt - 1 : prompt - 1 + response] = 1.0
    return {"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(n, generator=g)}


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in (("hidden", 256), ("layers", 2), ("vocab", 8192), ("seq", 512), ("seqs", 16), ("mbs", 4)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from megatron_sapo.megatron.engine import MegatronEngine

    batch = variable_length_batch(args)
    engines = {}
    for pack in (False, True):
        cfg = bench_moe_config(args, heads=8)
        cfg.train.pack_sequences = pack
        cfg.model.moe_router_load_balancing = "none"
        engines[pack] = MegatronEngine(cfg) if not engines else MegatronEngine(cfg, parallel=engines[False].par)
    engines[True].load_global_state_dict(engines[False].global_state_dict())  # the same weights on both sides
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    batch["old_log_probs"] = engines[False].compute_log_probs(batch)
    length = engines[False]._length(batch)
    rows = {pack: sum(mb["tokens"].shape[0] for mb in e._microbatches(batch, length)) for pack, e in engines.items()}
    times = {False: [], True: []}
    for i in range(args.repeats + 1):
        for pack, engine in engines.items():
            start = bench_clock()
            metrics = engine.forward_backward(batch)
            if i:  # the first round warms up
                times[pack].append(bench_clock() - start)
            if pack:
                packed_loss = metrics["loss"]
            else:
                padded_loss = metrics["loss"]
    tokens = int(batch["loss_mask"].sum())
    clock = "wall" if torch.cuda.is_available() else "CPU (1 thread)"
    print(f"machine: {machine_label()}; {clock} seconds")
    print(f"{args.seqs} sequences, {tokens} loss tokens, padded length {length}; micro-batches of {args.mbs} rows")
    print(f"rows run: padded {rows[False]}, packed {rows[True]}; losses {padded_loss:.6f} / {packed_loss:.6f}")
    for pack in (False, True):
        runs = [round(t, 4) for t in times[pack]]
        print(f"  {'packed' if pack else 'padded'}: min {min(times[pack]):.4f} s, runs {runs}")
    print(f"packed_step_speedup ratio={min(times[False]) / min(times[True]):.3f} goal>=1.0")


if __name__ == "__main__":
    main()
