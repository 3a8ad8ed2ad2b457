"""Pieces the engine benchmarks share: the tiny MoE they time, and a clock that other load cannot inflate."""

from __future__ import annotations

import os
import platform
import time

import torch


def bench_moe_config(args, heads: int):
    """An 8-expert top-2 MoE sized by the benchmark's --hidden/--layers/--vocab/--seq/--mbs options."""
    from megatron_sapo.config import Config

    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_layers, m.num_attention_heads, m.vocab_size = args.hidden, args.layers, heads, args.vocab
    m.num_experts, m.moe_topk, m.moe_ffn_hidden_size, m.ffn_hidden_size = 8, 2, args.hidden, 4 * args.hidden
    m.max_seq_len = args.seq + 1
    cfg.train.micro_batch_size = args.mbs
    # One intra-op thread on CPU: the engine would otherwise size its pool to the cores, and on a loaded box
    # two threads make single ops wait for a descheduled peer (a forward measured 0.35 s and 7 s in turn).
    cfg.parallel.cpu_threads = 1
    return cfg


def bench_clock() -> float:
    """GPU: wall seconds (after a synchronize). CPU: this process's CPU seconds: on a shared machine, other
    processes' load inflates wall time by whole seconds but not our CPU time."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def machine_label() -> str:
    """What absolute times were measured on: the GPU, or the CPU cores this process may use; and torch."""
    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} GPU"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        where = f"{cores}-core {platform.machine()} CPU, no GPU"
    return f"{where}; torch {torch.__version__}"
