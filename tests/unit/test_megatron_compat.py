"""Every CPU patch of megatron_sapo.megatron.compat is applied, and each changes what it targets: every
test calls the ORIGINAL (kept by compat) and shows that it fails where the patched version works.
The gloo uneven-gather patch needs two processes: tests/dist (test_gloo_uneven_gather_patch)."""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.megatron import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches apply only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def patched():
    return compat.apply_patches()


def test_all_patches_applied_once(patched):
    assert patched == list(compat.PATCHES)
    assert compat.apply_patches() == patched  # idempotent
    from torch.overrides import _get_current_function_mode_stack

    modes = [m for m in _get_current_function_mode_stack() if isinstance(m, compat._CudaArgsToCpu)]
    assert len(modes) == 1


def test_patch_selection_by_machine():
    # without CUDA every patch; a GPU without Transformer Engine still needs the TE-less bug fixes; with TE none
    assert compat.patches_for(cuda=False, te=False) == list(compat.PATCHES)
    assert compat.patches_for(cuda=True, te=False) == ["moe_te_names"]
    assert compat.patches_for(cuda=True, te=True) == []


def test_cuda_current_device():
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        compat.original("cuda_current_device")()


def test_cuda_synchronize():
    assert torch.cuda.synchronize() is None
    with pytest.raises((AssertionError, RuntimeError)):
        compat.original("cuda_synchronize")()


def test_cuda_streams():
    stream = torch.cuda.Stream()
    assert stream == torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        pass
    with pytest.raises((AssertionError, RuntimeError)):
        compat.original("cuda_streams")["Stream"]()


def test_cuda_rng_tracker_forks_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(7)  # the global stream: not the tracker's seed (an earlier test may have left it at 123)
    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("a", 123)
    with tracker.fork("a"):
        first = torch.rand(3)
    outside = torch.rand(3)
    tracker2 = mrandom.CudaRNGStatesTracker()
    tracker2.add("a", 123)
    with tracker2.fork("a"):
        again = torch.rand(3)
    assert torch.equal(first, again) and not torch.equal(first, outside)
    with pytest.raises((AssertionError, RuntimeError)):
        compat.original("cuda_rng")["get_rng_state"]()


def test_cuda_device_args():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t and t.to("cuda").device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)), torch._C.DisableTorchFunction():
        torch.zeros(2, device="cuda")


def test_device_args_suspended_only_inside():
    with compat.device_args_suspended(), pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")  # the mode is off: the literal raises, loudly
    assert torch.zeros(2, device="cuda").device.type == "cpu"  # and back on afterwards
    with compat._CudaTypeStrings(), compat.device_args_suspended():  # not innermost: left alone
        assert torch.zeros(2, device="cuda").device.type == "cpu"


def test_default_causal_mask_on_cpu_without_the_device_mode():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    with compat.device_args_suspended():
        mask = fused_softmax.get_default_causal_mask(4)
        assert utils.get_default_causal_mask is fused_softmax.get_default_causal_mask
        assert mask.dtype == torch.bool and torch.equal(mask, torch.ones(4, 4).triu(1).bool())
        with pytest.raises((AssertionError, RuntimeError)):
            compat.original("default_causal_mask")(4)


def _param_with_grad():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    return p


def test_cuda_type_strings_only_inside_megatron_checks():
    from megatron.core.optimizer import clip_grads, optimizer

    p = _param_with_grad()
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-5)
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    assert torch.zeros(1).type() == "torch.FloatTensor"  # the rest of the process sees true strings
    with pytest.raises(AssertionError):
        compat.original("cuda_type_strings")["clip_grad_by_total_norm_fp32"]([_param_with_grad()], 1.0, 4.0)


def test_moe_te_names():
    import megatron.core.transformer.moe.moe_utils as moe_utils

    inp, weight = torch.randn(5, 8), torch.randn(4, 8)
    out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
    assert torch.allclose(out, inp @ weight.T, atol=1e-5)
    missing = compat.original("moe_te_names")
    if not missing:  # a megatron-core version that defines them itself (0.19)
        return
    saved = {n: getattr(moe_utils, n) for n in missing}
    try:
        for n in missing:
            delattr(moe_utils, n)
        with pytest.raises(NameError):
            moe_utils.router_gating_linear(inp, weight, None, torch.float32)
    finally:
        for n, v in saved.items():
            setattr(moe_utils, n, v)


def test_moe_split_sizes_become_numpy():
    import numpy as np
    from megatron.core.transformer.moe import token_dispatcher

    splits = torch.tensor([3, 1])
    assert isinstance(token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True), np.ndarray)
    assert torch.is_tensor(compat.original("moe_split_sizes")(splits, as_numpy=True))


def _norm_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm")
    config.sequence_parallel = True  # set after __post_init__, which wants tp > 1 for it
    return config


def test_torch_norm_accepts_sequence_parallel_and_tags_params():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = _norm_config()
    norm = WrappedTorchNorm(config, 8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert config.sequence_parallel  # restored
    with pytest.raises(AssertionError):
        compat.original("torch_norm_sequence_parallel")(WrappedTorchNorm, config, 8)


def test_gloo_uneven_gather_patch_installed():
    import megatron.core.tensor_parallel.mappings as mappings

    assert mappings._gather_along_first_dim is not compat.original("gloo_uneven_gather")["gather"]
    assert mappings._reduce_scatter_along_first_dim is not compat.original("gloo_uneven_gather")["reduce_scatter"]


def test_distopt_checkpoint_unshares_adam_step():
    """After DistributedOptimizer.load_state_dict every param has its own Adam 'step' tensor (megatron
    hands one shared tensor to all; torch's Adam then increments it once per param)."""
    from megatron_sapo.config import Config
    from megatron_sapo.megatron.engine import MegatronEngine

    cfg = Config()
    cfg.model.num_layers, cfg.model.num_experts = 1, 2
    cfg.optim.distributed_optimizer = True
    engine = MegatronEngine(cfg)
    try:
        opt = engine.optimizer
        for sub in getattr(opt, "chained_optimizers", [opt]):
            sub._init_optimizer_states_with_dummy_values()
        state = opt.state_dict()
        opt.load_state_dict(state)
        steps = [s["step"] for sub in getattr(opt, "chained_optimizers", [opt]) for s in sub.optimizer.state.values()]
        assert len(steps) > 1 and len({id(s) for s in steps}) == len(steps)
        originals = compat.original("distopt_checkpoint")
        sub = getattr(opt, "chained_optimizers", [opt])[0]
        originals["load_state_dict"](sub, sub.state_dict())
        shared = [s["step"] for s in sub.optimizer.state.values()]
        assert len({id(s) for s in shared}) == 1  # what the patch fixes
    finally:
        engine.shutdown()


def test_multi_tensor_fallbacks_are_bitwise_the_originals():
    from megatron.core.optimizer import clip_grads

    originals = compat.original("multi_tensor_fallbacks")
    assert clip_grads.l2_norm_impl is not originals["l2_norm"]
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) for shape in [(64, 64), (7,), (3, 5, 11), (1,)]]
    flag = torch.zeros(1, dtype=torch.int)
    want, _ = originals["l2_norm"](2048, flag, [tensors], False)
    got, _ = clip_grads.l2_norm_impl(2048, flag, [tensors], False)
    assert got.shape == want.shape == (1,) and torch.equal(got, want)
    scaled = [t.clone() for t in tensors]
    clip_grads.multi_tensor_scale_impl(2048, flag, [scaled, scaled], 0.37)  # in place, as clipping does
    expect = [t.clone() for t in tensors]
    originals["scale"](2048, flag, [expect, expect], 0.37)
    assert all(torch.equal(a, b) for a, b in zip(scaled, expect))
    out = [torch.empty_like(t) for t in tensors]  # copies between tensors go to the original
    clip_grads.multi_tensor_scale_impl(2048, flag, [tensors, out], 2.0)
    assert all(torch.equal(o, t * 2.0) for o, t in zip(out, tensors))
