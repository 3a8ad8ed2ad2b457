"""Running megatron-core without CUDA: the one place that patches megatron-core / torch internals.

megatron-core assumes a GPU in many small places (`torch.cuda.current_device()` as a device, CUDA RNG
trackers, side streams, `device="cuda"` literals, type strings such as 'torch.cuda.FloatTensor') and has
a few gloo- and CPU-only bugs. On a machine without CUDA, `apply_patches()` works around each of them
with one named function below. With CUDA, megatron-core is used as shipped, except for the patches in
NO_TE_PATCHES: bugs of megatron-core without Transformer Engine, on any device (first seen on an H100 without
TE: RouterGatingLinearFunction's NameError). With CUDA and TE nothing is patched.

Rules every patch follows:
- it is applied only where `patches_for()` selects it (no CUDA: all), once (idempotent);
- it says why it exists and which megatron-core versions need it (tested on 0.16.1; the 0.19 differences
  found by the feasibility spike are kept: names that moved are looked up defensively);
- it keeps the original callable in `_ORIGINALS[name]` so tests can prove the patch changes behaviour.

Measured overhead: the only global patch with a per-call cost is `cuda_device_args` (a
TorchFunctionMode); the hot paths suspend it (device_args_suspended); see its docstring.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

# Versions the patches were checked against: the CPU CI installs 0.16.1 (Python 3.11); the spike also ran
# 0.19.2. Outside this range the patches still apply where their targets exist, with a warning.
TESTED_MCORE = ((0, 16), (0, 19))

_APPLIED: list[str] = []
_ORIGINALS: dict[str, object] = {}


def applied_patches() -> list[str]:
    """Names of the patches applied in this process, in order."""
    return list(_APPLIED)


def mcore_version() -> tuple[int, int]:
    import megatron.core

    major, minor = megatron.core.__version__.split(".")[:2]
    return int(major), int(minor)


def cuda_available() -> bool:
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------
# torch.cuda entry points
# ----------------------------------------------------------------------------------------------------------
def _patch_cuda_current_device() -> None:
    """`torch.cuda.current_device()` is passed as `device=` to torch.empty/zeros all over megatron-core
    (tensor_parallel mappings and layers, p2p communication, rotary embeddings, DDP buffers). On a CPU
    build it raises "Torch not compiled with CUDA enabled"; 'cpu' is a valid device for all those calls."""
    _ORIGINALS["cuda_current_device"] = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"


def _patch_cuda_synchronize() -> None:
    """p2p communication, DDP and the checkpoint code call `torch.cuda.synchronize()`; CPU ops are
    synchronous, so a no-op is exact."""
    _ORIGINALS["cuda_synchronize"] = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None


class _NullEvent:
    """Stands for torch.cuda.Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


class _NullStream:
    """Stands for torch.cuda.Stream. All instances compare equal: there is one (CPU) stream of work."""

    def __init__(self, *args, **kwargs):
        pass

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0

    def synchronize(self):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NullEvent()

    def query(self):
        return True


def _patch_cuda_streams() -> None:
    """MoEAlltoAllTokenDispatcher creates a `torch.cuda.Stream()` in __init__ and switches to it for its
    device-to-host copies of the split sizes; DDP's overlap path uses streams too. A CPU build can't
    create streams; a single null stream keeps the (already sequential) order."""
    names = ("Stream", "Event", "current_stream", "default_stream", "stream")
    _ORIGINALS["cuda_streams"] = {n: getattr(torch.cuda, n) for n in names}
    default = _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda *args, **kwargs: default
    torch.cuda.default_stream = lambda *args, **kwargs: default
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _patch_cuda_rng() -> None:
    """megatron's CudaRNGStatesTracker (tensor_parallel/random.py) forks named *CUDA* generator states for
    tensor-parallel and expert-parallel regions (dropout, initialisation). On CPU those regions draw from
    the CPU default generator, so the tracker saves/restores that generator instead. (torch.cuda.manual_seed
    would otherwise silently queue a seed that never applies, and get_rng_state raises.)"""
    from megatron.core.tensor_parallel import random as mrandom

    _ORIGINALS["cuda_rng"] = {
        "get_rng_state": torch.cuda.get_rng_state,
        "set_rng_state": torch.cuda.set_rng_state,
        "manual_seed": torch.cuda.manual_seed,
        "_get_cuda_rng_state": mrandom._get_cuda_rng_state,
        "_set_cuda_rng_state": mrandom._set_cuda_rng_state,
    }

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


# ----------------------------------------------------------------------------------------------------------
# device="cuda" literals and CUDA type strings
# ----------------------------------------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaArgsToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites `device="cuda"` arguments, `.cuda()`, `.to("cuda")` and pinned memory to their CPU
    equivalents. Every call it changes would raise on a CPU-only build, so it cannot change the result
    of code that works without it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_DEVICE_MODE: _CudaArgsToCpu | None = None


@contextlib.contextmanager
def device_args_suspended():
    """Run a hot path without the `cuda_device_args` mode: the model forward (loss_glue) and in-process
    generation (rollout/local.py) reach no `device="cuda"` literal once `default_causal_mask` is patched,
    and every torch call they make would otherwise pay one Python call (~15-20% of a tiny CPU RL step,
    measured with tools/bench_vs_trl.py). A literal that is reached anyway raises "Torch not compiled with
    CUDA enabled": loud, never a silent change. Suspends only when the mode is the innermost one."""
    from torch.overrides import _get_current_function_mode

    mode = _DEVICE_MODE
    if mode is None or _get_current_function_mode() is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def _patch_cuda_device_args() -> None:
    """megatron-core writes `device="cuda"` literally in ~40 places we reach: the schedules' token counter
    (`total_num_tokens = torch.zeros(..., device="cuda")` in every forward_backward_*), the optimizer's
    found-inf / scale tensors, clip_grads' norm tensor, dist_checkpointing's exchange buffers. They sit
    inside long functions, so there is no narrower hook than a torch function mode, entered once for the
    process. Why it is safe: see _CudaArgsToCpu. Cost: one Python call per torch function call, so the
    model forward and in-process generation run with it suspended (device_args_suspended)."""
    global _DEVICE_MODE
    _DEVICE_MODE = _CudaArgsToCpu()
    _DEVICE_MODE.__enter__()


def _patch_recompute_device_args() -> None:
    """Activation recompute (model.recompute_granularity) reruns a layer's forward inside
    `CheckpointFunction.backward`, which the autograd engine calls from `torch.autograd.backward`. That call
    itself went through the cuda_device_args mode, and a mode is switched off while it handles a call, so
    the recomputed forward met `device="cuda"` literals unpatched (the default causal mask). The backward
    runs with the mode pushed again. Needs cuda_device_args first; 0.16.1 and 0.19 (same class)."""
    from megatron.core.tensor_parallel import random as mrandom

    backward = mrandom.CheckpointFunction.backward
    _ORIGINALS["recompute_device_args"] = backward

    def backward_with_mode(ctx, *args):
        with _DEVICE_MODE:
            return backward(ctx, *args)

    mrandom.CheckpointFunction.backward = staticmethod(backward_with_mode)


class _CudaTypeStrings(torch.overrides.TorchFunctionMode):
    """`Tensor.type()` answers 'torch.cuda.FloatTensor' for a CPU float tensor (and likewise for the other
    dtypes)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        is_type_string = func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str)
        if is_type_string and out.startswith("torch.") and not out.startswith("torch.cuda."):
            out = "torch.cuda." + out[len("torch.") :]
        return out


def _with_cuda_type_strings(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaTypeStrings():
            return fn(*args, **kwargs)

    wrapper.__wrapped_by_megatron_sapo__ = True
    return wrapper


def _patch_cuda_type_strings() -> None:
    """The distributed optimizer (param-group building), and clip_grads assert
    `param.type() == 'torch.cuda.FloatTensor'` ("Wrapped parameters must be one of torch.cuda.FloatTensor,
    ..."). Only inside those functions, CPU tensors report the CUDA type string of their dtype; the rest of
    the process sees the true strings."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    dopt = distrib_optimizer.DistributedOptimizer
    _ORIGINALS["cuda_type_strings"] = {
        "DistributedOptimizer.__init__": dopt.__init__,
        "clip_grad_by_total_norm_fp32": clip_grads.clip_grad_by_total_norm_fp32,
    }
    # __init__ covers _build_model_and_main_param_groups, which only __init__ calls.
    dopt.__init__ = _with_cuda_type_strings(dopt.__init__)
    clip = _with_cuda_type_strings(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    # optimizer.py imported the name at module load: patch its binding too.
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = clip


# ----------------------------------------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------------------------------------
_TE_MOE_NAMES = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_and_pad_with_probs",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)


def _patch_default_causal_mask() -> None:
    """The local spec's softmax builds its causal mask with `torch.ones(sq, sq, device="cuda")`
    (transformer/utils.py get_default_causal_mask, imported by name into fusions/fused_softmax.py). The
    device mode would rewrite it, but the model forward runs with that mode suspended (see
    device_args_suspended), so the mask is built on the CPU here: the same upper-triangular bool mask."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    _ORIGINALS["default_causal_mask"] = utils.get_default_causal_mask

    @functools.lru_cache(maxsize=32)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask


def _patch_moe_te_names() -> None:
    """megatron-core 0.16 defines moe_utils' fused_* / te_general_gemm names only when Transformer Engine
    imports, but tests them with `is not None` (RouterGatingLinearFunction: NameError 'te_general_gemm').
    Defining the missing names as None selects the plain-torch paths. 0.19 defines them itself."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    missing = [name for name in _TE_MOE_NAMES if not hasattr(moe_utils, name)]
    _ORIGINALS["moe_te_names"] = missing
    for name in missing:
        setattr(moe_utils, name, None)


def _patch_moe_split_sizes() -> None:
    """The alltoall dispatcher turns its split sizes into numpy with `maybe_move_tensor_to_cpu(t,
    as_numpy=True)`, which converts only CUDA tensors; a CPU tensor then reaches
    dist.all_to_all_single(output_split_sizes=<Tensor>), which raises TypeError (EP > 1). Here CPU tensors
    are converted too."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    _ORIGINALS["moe_split_sizes"] = original

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ----------------------------------------------------------------------------------------------------------
# Sequence parallel with the torch norm; gloo collectives
# ----------------------------------------------------------------------------------------------------------
def _patch_torch_norm_sequence_parallel() -> None:
    """Without Apex/TE the local spec's norm is WrappedTorchNorm, which asserts `not sequence_parallel`.
    A norm is exact under SP (it is per token); what SP needs is that its parameters carry
    `sequence_parallel=True` so finalize_model_grads all-reduces their gradients over TP (as Apex's and
    TE's norms do). Build with SP hidden from the assertion, then tag the parameters."""
    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__
    _ORIGINALS["torch_norm_sequence_parallel"] = original

    def __new__(cls, config, hidden_size, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original(cls, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def _patch_gloo_uneven_gather() -> None:
    """tensor_parallel.mappings gathers / reduce-scatters *uneven* first-dim splits with list collectives
    (`_gather_along_first_dim(output_split_sizes=...)`, `_reduce_scatter_along_first_dim(input_split_sizes=
    ...)`, used by the alltoall dispatcher when expert-TP > 1). gloo requires equal sizes ("invalid tensor
    size"). Fallback for uneven splits on gloo: pad + all_gather + trim, and all_reduce + slice."""
    import megatron.core.tensor_parallel.mappings as mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim
    _ORIGINALS["gloo_uneven_gather"] = {"gather": gather, "reduce_scatter": reduce_scatter}

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        buffers = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buffers, padded.contiguous(), group=group)
        return torch.cat([buf[:n] for buf, n in zip(buffers, sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        full = input_.contiguous().clone()
        dist.all_reduce(full, group=group)
        start = sum(sizes[: group.rank()])
        return full[start : start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


# ----------------------------------------------------------------------------------------------------------
# Distributed-optimizer checkpoints with torch.optim.Adam (no TE / Apex)
# ----------------------------------------------------------------------------------------------------------
def _patch_distopt_checkpoint() -> None:
    """Loading a distributed-optimizer checkpoint with torch's Adam (the optimizer megatron falls back to
    without TE/Apex) fails or resumes wrongly:
    (1) `_set_main_param_and_optimizer_states` copies every saved state key into torch Adam's state, which
        lacks 'step' in the reshardable formats (KeyError), and copies into a view of a leaf fp32 param
        without no_grad (RuntimeError). Fix: keep existing tensors for missing keys; run under no_grad.
    (2) `load_state_dict` hands ONE 'step' tensor to every param's state; torch Adam increments it in
        place once per param, so the bias correction is wrong after resume. Fix: give each param its own.
    (A fresh optimizer also needs `_init_optimizer_states_with_dummy_values()` before its load state dict
    is built: that is done by megatron_sapo.megatron.checkpoint, not patched.)"""
    from megatron.core.optimizer import distrib_optimizer

    dopt = distrib_optimizer.DistributedOptimizer
    set_states, load_state_dict = dopt._set_main_param_and_optimizer_states, dopt.load_state_dict
    _ORIGINALS["distopt_checkpoint"] = {"set_states": set_states, "load_state_dict": load_state_dict}

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        tensors = dict(tensors)
        if not getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            group_index, order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][order]
            for key, value in self.optimizer.state[main_param].items():
                if torch.is_tensor(value) and key not in tensors:
                    tensors[key] = value.clone()
        with torch.no_grad():
            return set_states(self, model_param, tensors)

    def _load_state_dict(self, state_dict):
        out = load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return out

    dopt._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    dopt.load_state_dict = _load_state_dict


# ----------------------------------------------------------------------------------------------------------
# Multi-tensor fallbacks of the optimizer step
# ----------------------------------------------------------------------------------------------------------
def _patch_multi_tensor_fallbacks() -> None:
    """Without TE/Apex, the grad norm and the clipping of every optimizer step (clip_grads, optimizer) use
    megatron.core.utils' Python fallbacks: one torch call per parameter, and `torch.tensor()` of a list of
    0-d tensors. Not a CUDA fix but the CPU cost of a tiny model's step (~1.5 ms of ~6 per optimizer step):
    torch's foreach ops run the same per-tensor CPU kernels in a few calls, so the values are bitwise the
    same (tests/unit/test_megatron_compat.py). Only the fallbacks are replaced; 0.16.1 and 0.19."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    l2_norm, scale = utils.local_multi_tensor_l2_norm, utils.local_multi_tensor_scale
    _ORIGINALS["multi_tensor_fallbacks"] = {"l2_norm": l2_norm, "scale": scale}

    def local_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        tensors = [t for tensor_list in tensor_lists for t in tensor_list]
        if not tensors or any(t.is_cuda for t in tensors):
            return l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args)
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))  # norm of the norms
        return total.reshape(1).float(), None

    def local_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, factor):
        src, dst = tensor_lists
        if len(src) != len(dst) or any(a is not b or a.is_cuda for a, b in zip(src, dst)):
            return scale(chunk_size, noop_flag, tensor_lists, factor)  # copies between tensors: as shipped
        if dst:
            torch._foreach_mul_(dst, factor)  # in place (grad clipping)

    for module in (clip_grads, optimizer):
        if getattr(module, "l2_norm_impl", None) is l2_norm:
            module.l2_norm_impl = local_multi_tensor_l2_norm
        if getattr(module, "multi_tensor_scale_impl", None) is scale:
            module.multi_tensor_scale_impl = local_multi_tensor_scale


# ----------------------------------------------------------------------------------------------------------
# Application
# ----------------------------------------------------------------------------------------------------------
# Order matters only in that the device mode goes last (it wraps everything after it).
PATCHES: dict[str, Callable[[], None]] = {
    "cuda_current_device": _patch_cuda_current_device,
    "cuda_synchronize": _patch_cuda_synchronize,
    "cuda_streams": _patch_cuda_streams,
    "cuda_rng": _patch_cuda_rng,
    "cuda_type_strings": _patch_cuda_type_strings,
    "default_causal_mask": _patch_default_causal_mask,
    "moe_te_names": _patch_moe_te_names,
    "moe_split_sizes": _patch_moe_split_sizes,
    "torch_norm_sequence_parallel": _patch_torch_norm_sequence_parallel,
    "gloo_uneven_gather": _patch_gloo_uneven_gather,
    "distopt_checkpoint": _patch_distopt_checkpoint,
    "multi_tensor_fallbacks": _patch_multi_tensor_fallbacks,
    "cuda_device_args": _patch_cuda_device_args,
    "recompute_device_args": _patch_recompute_device_args,  # after cuda_device_args: uses its mode
}


# Bugs of megatron-core without Transformer Engine, whatever the device: also applied on GPUs without TE.
NO_TE_PATCHES = ("moe_te_names",)


def transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def patches_for(cuda: bool, te: bool) -> list[str]:
    """The patch names for a machine: every patch without CUDA; on CUDA only the TE-less fixes, none with TE."""
    if not cuda:
        return list(PATCHES)
    return [] if te else list(NO_TE_PATCHES)


def apply_patches() -> list[str]:
    """Apply the patches this machine needs (patches_for), each once; returns applied_patches()."""
    cuda = cuda_available()
    names = patches_for(cuda, te=transformer_engine_importable() if cuda else False)
    if not names:
        return applied_patches()
    version = mcore_version()
    if not TESTED_MCORE[0] <= version <= TESTED_MCORE[1]:
        warnings.warn(
            f"megatron-core {version} is outside the range the CPU patches were tested on "
            f"({TESTED_MCORE[0]}..{TESTED_MCORE[1]}); CPU results are unverified",
            stacklevel=2,
        )
    for name in names:
        if name not in _APPLIED:
            PATCHES[name]()
            _APPLIED.append(name)
    return applied_patches()


def original(name: str):
    """The object a patch replaced (for tests that prove the patch matters)."""
    return _ORIGINALS[name]
