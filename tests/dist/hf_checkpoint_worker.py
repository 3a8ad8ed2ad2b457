"""Sharded HF checkpoint loading across layouts, launched by tests/dist/test_hf_checkpoint_dist.py through
torchrun (4 processes). Each layout loads the same HF checkpoint (written by the test, with the world-size-1
load's weights in OUT/ref.pt), gathers the global weights and records which HF tensors each rank read.
Results go to OUT/multi.pt from rank 0; the pytest side asserts on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from megatron_sapo.config import Config, ParallelConfig  # noqa: E402
from megatron_sapo.megatron import compat, hf_checkpoint  # noqa: E402
from megatron_sapo.megatron.engine import MegatronEngine  # noqa: E402
from megatron_sapo.megatron.parallel import init_parallel, init_torch_distributed  # noqa: E402

# MoE layouts with TP > 1 need sequence parallel; dp fills the 4 ranks.
LAYOUTS = {
    "tp2_ep2_sp": dict(tp=2, sp=True, ep=2, dp=2),
    "pp2_dp2": dict(pp=2, dp=2),
    "pp2_tp2_sp_tied": dict(pp=2, tp=2, etp=2, sp=True),  # the last stage's output layer is the embedding
}


def make_config(tie: bool = False, **parallel) -> Config:
    """4 layers, GQA (q/k/v split per group), 4 experts, no shared expert (Qwen3-MoE has none)."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 4, 64, 4, 2
    m.vocab_size, m.max_seq_len, m.num_experts, m.moe_topk, m.moe_ffn_hidden_size = 128, 64, 4, 2, 32
    m.tie_embeddings = tie
    m.init = "seeded"  # layout-independent initial weights: checked against world size 1 before the HF load
    cfg.parallel = ParallelConfig(**parallel)
    return cfg


def load_at(name: str, layout: dict, hf_dir: str, ref: dict) -> dict:
    """Load the HF checkpoint at one layout; every rank's read names and coordinates, the gathered weights'
    agreement with the world-size-1 load (on rank 0)."""
    tie = name.endswith("_tied")
    cfg = make_config(tie=tie, **layout)
    par = init_parallel(cfg.parallel, seed=cfg.train.seed)
    try:
        engine = MegatronEngine(cfg, parallel=par)
        initial = engine.global_state_dict()
        read: list[str] = []
        original = hf_checkpoint.HFReader.get
        hf_checkpoint.HFReader.get = lambda self, n: read.append(n) or original(self, n)
        try:
            engine.load_hf_checkpoint(os.path.join(hf_dir, "tied" if tie else "untied"))
        finally:
            hf_checkpoint.HFReader.get = original
        got = engine.global_state_dict()
        mine = {"pp_rank": par.pp_rank, "ep_rank": par.ep_rank, "tp_rank": par.tp_rank, "read": read}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        want, want_initial = ref["tied" if tie else "untied"], ref["initial_tied" if tie else "initial_untied"]
        same = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        seeded = initial.keys() == want_initial.keys() and all(torch.equal(initial[k], want_initial[k])
                                                               for k in want_initial)  # fmt: skip
        return {"equal": same, "seeded_init_equal": seeded, "ranks": everyone}
    finally:
        par.teardown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    args = parser.parse_args()
    start = time.time()
    compat.apply_patches()
    init_torch_distributed()
    ref = torch.load(os.path.join(args.out_dir, "ref.pt"), weights_only=True)
    res = {name: load_at(name, layout, args.out_dir, ref) for name, layout in LAYOUTS.items()}
    if dist.get_rank() == 0:
        torch.save(res, os.path.join(args.out_dir, "multi.pt"))
        print(f"done in {time.time() - start:.1f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing may spawn a process that re-imports __main__
    sys.exit(main())
