"""Runtime fix for sglang==0.5.23 on device=cpu, loaded at interpreter start by sglang_cpu_fixes.pth.

Why: with --enable-return-routed-experts, sglang 0.5.23 allocates the routed-experts host buffer through
ALLOC_MEMORY_FUNCS["cpu"] in sglang.srt.mem_cache.pool_host.common, which pins it (cudaHostRegister via
torch.cuda.cudart()) and kills a CPU-only server ("Found no NVIDIA driver"). On device=cpu the buffer already
is host memory, so this allocates it unpinned. Active only when SGLANG_USE_CPU_ENGINE=1 and the sglang
version is the pinned one; SGLANG_KIT_FIXES=0 turns it off. Tested by tests/sglang/test_kit.py.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

SGLANG_VERSION = "0.5.23"
TARGET = "sglang.srt.mem_cache.pool_host.common"


def alloc_unpinned(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
    """Same signature as sglang's alloc_with_host_register, minus the pinning."""
    import torch

    if allocator is not None:
        return allocator.allocate(dims, dtype=dtype, device=device)
    return torch.empty(dims, dtype=dtype, device=device)


def patch(module) -> None:
    module.ALLOC_MEMORY_FUNCS["cpu"] = alloc_unpinned


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds TARGET with the normal machinery, then patches the module right after it executes."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _pinned_version_installed() -> bool:
    import importlib.metadata

    try:
        return importlib.metadata.version("sglang") == SGLANG_VERSION
    except importlib.metadata.PackageNotFoundError:
        return False


if (
    os.environ.get("SGLANG_USE_CPU_ENGINE") == "1"
    and os.environ.get("SGLANG_KIT_FIXES", "1") == "1"
    and _pinned_version_installed()
):
    sys.meta_path.insert(0, _PatchOnImport())
