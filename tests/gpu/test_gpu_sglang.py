"""A real SGLang server on GPU: the `tensor` (CUDA IPC / shared memory) and `distributed` (NCCL) weight-sync
transports change the served weights. Skipped without CUDA (tests/conftest.py) or without sglang in the SGLang
interpreter: SGLANG_GPU_PYTHON, else rollout.sglang.python's default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_sapo.config import SGLangConfig, load_config

pytestmark = pytest.mark.gpu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.environ.get("SGLANG_GPU_PYTHON", SGLangConfig().python)
# The server runs bf16 (the trainer's GPU dtype), the reference is the fp32 HF model on the same (bf16-representable)
# weights: bf16 rounds logits of O(1) to 2^-8 relative (~4e-3) and the attention / MoE activations likewise, so
# served log-probs differ by ~1e-2; 0.1 leaves headroom, while stale weights (the check below) are off by O(1).
BF16_TOL = 0.1


def _sglang_python() -> str:
    try:
        proc = subprocess.run([PYTHON, "-c", "import sglang"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"SGLang interpreter {PYTHON!r} (SGLANG_GPU_PYTHON / rollout.sglang.python) does not run: {e}")
    if proc.returncode != 0:
        pytest.skip(f"sglang does not import in {PYTHON!r} (set SGLANG_GPU_PYTHON): {proc.stderr.strip()[-300:]}")
    return PYTHON


def _bf16(state: dict) -> dict:
    return {k: v.bfloat16().float().contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, initial HF state): one SGLang GPU server with the tiny MoE (tools/sglang_cpu_kit's builder).
    With >= 2 GPUs the server sits on GPU 1, so that the trainer (GPU 0) and the server can share an NCCL group
    (NCCL refuses two ranks on one device)."""
    python = _sglang_python()
    sys.path.insert(0, os.path.join(REPO, "tools", "sglang_cpu_kit"))
    from make_tiny_model import build
    from safetensors.torch import load_file

    from megatron_sapo.rollout.sglang_engine import SGLangEngine

    gpu = 1 if torch.cuda.device_count() >= 2 else 0
    cfg = load_config(os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"), [
        "rollout.engine=sglang", f"rollout.sglang.python={python}", "rollout.sglang.device=cuda",
        f"rollout.sglang.base_gpu_id={gpu}", "model.dtype=bf16", "model.kv_channels=64",
        "rollout.sglang.max_total_tokens=4096", "rollout.sglang.startup_timeout_s=900",
        "rollout.sglang.request_timeout_s=300", "rollout.sglang.base_port=32000",
        f"rollout.sglang.verify_tol={BF16_TOL}", "rollout.sglang.return_routed_experts=false",
        "rollout.sglang.extra_args=[--disable-cuda-graph, --attention-backend, triton]",
    ])  # fmt: skip
    # head_dim 64 (model.kv_channels): the size every GPU attention kernel supports; the triton backend and no
    # CUDA graphs keep the tiny model off kernel-specific shape limits and shorten start-up
    path = build(str(tmp_path_factory.mktemp("tiny_moe_gpu")), cfg, seed=0)
    initial = _bf16(load_file(os.path.join(path, "model.safetensors")))
    eng = SGLangEngine(cfg.rollout, cfg.model, work_dir=str(tmp_path_factory.mktemp("sglang_gpu")),
                       tokenizer_path=path, eos_token_id=2, model_path=path, seed=0, progress=False)  # fmt: skip
    try:
        assert eng.device == "cuda" and eng.dtype == "bfloat16"
        eng.update_weights(initial, 0)  # disk transport (the config's default): the launch weights as v0
        yield eng, initial
    finally:
        eng.shutdown()


def _perturbed(state: dict, seed: int) -> dict:
    """Every matrix moved by its own std: a policy whose log-probs differ by O(1) from the initial one."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        noise = torch.randn(t.shape, generator=gen) * (float(t.std()) if t.dim() > 1 else 0.0)
        out[name] = t + noise
    return _bf16(out)


def _check_transport(engine, initial: dict, transport: str, version: int) -> None:
    from megatron_sapo.rollout.base import SamplingParams

    engine.set_transport(transport)
    assert engine.transport == transport
    new_state = _perturbed(initial, seed=version)
    engine.update_weights(new_state, version)  # raises LogProbMismatch past verify_tol
    check = engine.last_check
    print(f"{transport}: sync {engine.last_sync_s:.2f} s, post-sync check {check}")
    assert check["sync/tokens_checked"] > 0
    assert check["sync/logprob_abs_diff_max"] < BF16_TOL, check
    assert engine.weight_version == version
    samples = engine.generate([[1, 5, 6, 7, 8], [1, 22, 23, 24]], SamplingParams(n=1, max_new_tokens=8,
                              temperature=0.0), {"ignore_eos": True})  # fmt: skip
    assert [s.weight_version for s in samples] == [version, version]
    # the served weights really are the new ones: against the old weights the same check fails clearly
    stale = engine.check_log_probs(initial)
    assert stale["sync/logprob_abs_diff_max"] > BF16_TOL, stale
    # back to the launch weights with the same transport; the check passes against them again
    engine.update_weights(initial, 0)
    assert engine.last_check["sync/logprob_abs_diff_max"] < BF16_TOL


def test_tensor_transport_changes_served_weights(served):
    engine, initial = served
    _check_transport(engine, initial, "tensor", version=21)


def test_distributed_transport_changes_served_weights(served):
    if torch.cuda.device_count() < 2:
        pytest.skip("the distributed transport's NCCL group needs the trainer and the server on different GPUs")
    engine, initial = served
    _check_transport(engine, initial, "distributed", version=22)
