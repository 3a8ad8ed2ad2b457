"""Pure-torch stand-in for `sgl_kernel` (the CPU build of sgl-kernel), for sglang==0.5.23 on CPU.

Why: PyPI ships only the CUDA build of sgl-kernel (`sglang-kernel`, needs libcuda.so.1); there is no CPU wheel.
On x86 CPUs without AMX, sglang 0.5.23's CPU engine (SGLANG_USE_CPU_ENGINE=1) already uses torch-native
norms, activations, rope and MoE; what blocks it are a few names imported at module import time under
`if _is_cpu:`. This package provides exactly those names:
  - copy_all_layer_kv_cache_cpu, assign_req_to_token_pool_cpu: implemented (KV-cache bookkeeping);
  - speculative-decoding and mamba kernels: present so imports succeed, raise NotImplementedError if called.
Any other `from sgl_kernel import X` raises ImportError as a build without X would, so sglang's own
fallbacks still apply. Pinned to sglang 0.5.23: another sglang version is refused at import (re-check the
names above before changing the pin in setup.sh). Tested by tests/sglang/test_kit.py.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging

import torch

SGLANG_VERSION = "0.5.23"
__version__ = "0.4.10"  # the sgl-kernel version sglang 0.5.23 pins (it checks the attribute)

try:
    _found = importlib.metadata.version("sglang")
except importlib.metadata.PackageNotFoundError:
    _found = None
if _found is not None and _found != SGLANG_VERSION:
    raise ImportError(
        f"sgl_kernel CPU stand-in is written for sglang=={SGLANG_VERSION}, found sglang=={_found}: "
        "re-check the names it provides, then update SGLANG_VERSION (tools/sglang_cpu_kit/standins)"
    )

_log = logging.getLogger("sgl_kernel_standin")
_called: set[str] = set()


def _note(name: str) -> None:
    if name not in _called:
        _called.add(name)
        _log.info("sgl_kernel stand-in: %s called", name)


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc, src_loc) -> None:
    """For every KV buffer b (base address data_ptrs[b], row size strides[b] bytes) copy row src_loc[i] to row
    tgt_loc[i]; all sources are read before any target is written (the two sets may overlap)."""
    _note("copy_all_layer_kv_cache_cpu")
    src, tgt = src_loc.tolist(), tgt_loc.tolist()
    for base, row in zip(data_ptrs.tolist(), strides.tolist()):
        rows = [ctypes.string_at(base + s * row, row) for s in src]
        for t, data in zip(tgt, rows):
            ctypes.memmove(base + t * row, data, row)


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """req_to_token[r, start:end] = the next (end - start) entries of out_cache_loc, request by request."""
    _note("assign_req_to_token_pool_cpu")
    offset = 0
    for r, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        if end > start:
            req_to_token[r, start:end] = out_cache_loc[offset : offset + end - start].to(req_to_token.dtype)
        offset += max(end - start, 0)


def _not_implemented(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel CPU stand-in: {name} is not implemented (speculative decoding / mamba kernels are "
            "not supported by the CPU kit)"
        )

    kernel.__name__ = name
    return kernel


_PROVIDED = {
    "copy_all_layer_kv_cache_cpu": copy_all_layer_kv_cache_cpu,
    "assign_req_to_token_pool_cpu": assign_req_to_token_pool_cpu,
}
# imported at module import time by sglang 0.5.23's speculative-decoding modules when is_cpu()
for _name in (
    "rotate_input_ids_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "build_draft_decode_metadata_cpu",
):
    _PROVIDED[_name] = _not_implemented(_name)


def __getattr__(name: str):
    if name in _PROVIDED:
        return _PROVIDED[name]
    raise AttributeError(f"sgl_kernel CPU stand-in has no {name!r}")
