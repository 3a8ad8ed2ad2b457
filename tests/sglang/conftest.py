"""Tests against a REAL SGLang server process on CPU (the kit in tools/sglang_cpu_kit).

One server is started per session (start-up dominates the wall time) and stopped by PID at the end. Without
the kit venv the tests skip, unless CI is set: then a missing kit is a failure (CI must build it first with
`bash tools/sglang_cpu_kit/setup.sh`). SGLANG_KIT_PYTHON points at another kit interpreter.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIT_PYTHON = os.environ.get("SGLANG_KIT_PYTHON", os.path.join(REPO, ".venv-sglang", "bin", "python"))
ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def pytest_configure(config):
    config.addinivalue_line("markers", "sglang: against a real SGLang server process (needs the CPU kit on CPU)")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.sglang)


def require_kit() -> str:
    if os.path.exists(KIT_PYTHON):
        return KIT_PYTHON
    message = f"SGLang CPU kit not found at {KIT_PYTHON}; build it with `bash tools/sglang_cpu_kit/setup.sh`"
    if ON_CI:
        pytest.fail(f"CI is set and {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kit_python() -> str:
    return require_kit()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, kit_python):
    """(Config, model dir): the tiny recipe's MoE (2 layers, 4 experts, top-2, vocab 64, context 64)."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools", "sglang_cpu_kit"))
    from make_tiny_model import build

    from megatron_sapo.config import load_config

    cfg = load_config(os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"), [
        "rollout.engine=sglang", f"rollout.sglang.python={kit_python}", "rollout.sglang.max_total_tokens=4096",
        "rollout.sglang.max_concurrency=16", "rollout.sglang.startup_timeout_s=600",
        "rollout.sglang.request_timeout_s=120", "rollout.sglang.base_port=31000",
    ])  # fmt: skip
    path = build(str(tmp_path_factory.mktemp("tiny_moe")), cfg, seed=0)
    return cfg, path


@pytest.fixture(scope="session")
def engine(tiny, tmp_path_factory):
    from megatron_sapo.rollout.sglang_engine import SGLangEngine

    cfg, path = tiny
    eng = SGLangEngine(cfg.rollout, cfg.model, work_dir=str(tmp_path_factory.mktemp("sglang")), tokenizer_path=path,
                       eos_token_id=2, model_path=path, seed=0)  # fmt: skip
    pids = [p for p in eng.pids if p]
    from safetensors.torch import load_file

    eng.update_weights(load_file(os.path.join(path, "model.safetensors")), 0)  # disk transport, checked after
    yield eng
    eng.shutdown()
    for pid in pids + [p for p in eng.pids if p]:
        wait_group_gone(pid, "server")


def wait_group_gone(pgid: int, what: str, timeout_s: float = 30) -> None:
    """Assert that a stopped process group disappears (its last children are reaped within seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"{what} process group {pgid} still alive {timeout_s} s after stop"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def initial_state(tiny):
    """The HF state dict the server was launched with."""
    from safetensors.torch import load_file

    return load_file(os.path.join(tiny[1], "model.safetensors"))


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """New weights: every matrix moved by `scale` of its own std (a visibly different policy)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        noise = torch.randn(t.shape, generator=gen) * (t.float().std() if t.dim() > 1 else 0.0) * scale
        out[name] = (t.float() + noise).to(t.dtype).contiguous()
    return out


def kill_group(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)
