"""The CPU kit's stand-ins, exercised inside the kit venv (no server needed)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import REPO


def run_kit(kit_python: str, code: str, **env) -> dict:
    out = subprocess.run([kit_python, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env, "PYTHONPATH": ""}, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sgl_kernel_standin_semantics(kit_python):
    code = r"""
import ctypes, json, torch, sgl_kernel
# KV copy: rows src -> tgt in every buffer, reading all sources first (overlapping sets)
bufs = [torch.arange(24, dtype=torch.float32).view(6, 4).clone(),
        torch.arange(12, dtype=torch.int64).view(6, 2).clone()]
ref = [b.clone() for b in bufs]
src, tgt = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 5])
for r in ref:
    r[tgt] = r[src].clone()
ptrs = torch.tensor([b.data_ptr() for b in bufs])
strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
sgl_kernel.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
kv_ok = all(torch.equal(a, b) for a, b in zip(bufs, ref))
# req_to_token: request r gets the next (end - start) cache locations at [start, end)
req_to_token = torch.zeros(3, 8, dtype=torch.int32)
sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), req_to_token, torch.tensor([1, 0]), torch.tensor([4, 2]),
                                        torch.tensor([10, 11, 12, 13, 14]), 8)
assign_ok = req_to_token[2, 1:4].tolist() == [10, 11, 12] and req_to_token[0, :2].tolist() == [13, 14] \
    and int(req_to_token.sum()) == 60
try:
    sgl_kernel.verify_tree_greedy_cpu(); stub = "no error"
except NotImplementedError as e:
    stub = str(e)
try:
    from sgl_kernel import fused_sigmoid_mul_cpu; missing = "imported"
except ImportError:
    missing = "ImportError"
print(json.dumps({"kv": kv_ok, "assign": assign_ok, "stub": stub, "missing": missing}))
"""
    r = run_kit(kit_python, code)
    assert r["kv"] and r["assign"]
    assert "verify_tree_greedy_cpu is not implemented" in r["stub"]
    assert r["missing"] == "ImportError"  # sglang's own fallbacks see a build without it


@pytest.mark.parametrize("cpu_engine", ["1", "0"])
def test_routed_experts_buffer_unpinned_on_cpu(kit_python, cpu_engine):
    code = r"""
import json, torch
from sglang.srt.mem_cache.pool_host import common
f = common.ALLOC_MEMORY_FUNCS["cpu"]
result = {"patched": f.__module__ == "sglang_cpu_fixes"}
if result["patched"]:
    t = f((4, 2, 2), torch.int32, "cpu", True, None)
    result.update(shape=list(t.shape), pinned=t.is_pinned())
print(json.dumps(result))
"""
    r = run_kit(kit_python, code, SGLANG_USE_CPU_ENGINE=cpu_engine)
    if cpu_engine == "1":
        assert r == {"patched": True, "shape": [4, 2, 2], "pinned": False}
    else:
        assert r == {"patched": False}  # GPU / non-CPU-engine runs keep sglang's pinned allocator


def test_torchvision_standin_imports_and_refuses_use(kit_python):
    code = r"""
import json, importlib.metadata as md
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode
try:
    T.Resize(3); used = "worked"
except RuntimeError as e:
    used = str(e)
try:
    md.version("torchvision"); dist = "installed"
except md.PackageNotFoundError:
    dist = "absent"
print(json.dumps({"mode": InterpolationMode.BICUBIC.value, "used": used, "dist": dist}))
"""
    r = run_kit(kit_python, code)
    assert r["mode"] == "bicubic" and "torchvision.transforms.Resize is unavailable" in r["used"]
    assert r["dist"] == "absent"  # so transformers does not think torchvision is usable


def test_kit_pins(kit_python):
    r = run_kit(kit_python, "import json, torch, importlib.metadata as m; "
                "print(json.dumps({'torch': torch.__version__, 'sglang': m.version('sglang'), "
                "'router': m.version('sglang-router')}))")  # fmt: skip
    assert r["sglang"] == "0.5.23" and "+cpu" in r["torch"] and r["router"] == "0.3.2"
