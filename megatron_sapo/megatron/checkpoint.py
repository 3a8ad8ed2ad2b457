"""Save / load model, optimizer, LR schedule, RNG and caller state with megatron's dist_checkpointing.

The checkpoint is layout-independent: tensors are stored by their global keys (TP/PP/EP resharding on
load), model chunks are stored under `model.chunk{i}` but looked up by those same global keys, and the
distributed optimizer uses the `fully_reshardable` format (the default `dp_reshardable` format cannot be
saved with torch's Adam: "ShardedTensor.flattened_range is not supported").

megatron builds ONE optimizer at EP=1 but a chained (dense + expert) one at EP>1, with different
param groups. For the distributed optimizer the state is stored layout-free: tensor keys without the
`chained_{i}.` prefix (`chained_optim_avoid_prefix`), and on load each sub-optimizer's param groups come
from the current optimizer (hyperparameters are config; the LR is the scheduler's) with the saved Adam step
count. Known limit: WITHOUT the distributed optimizer, EP=1 <-> EP>1 resume is not supported (the spike
found it fails); same-EP layout changes work.

megatron's writer keeps its results queue in a spawned multiprocessing Manager; save_checkpoint gives it a
plain queue first (_results_queue_without_a_manager), so a save starts no spawned process (its writers fork).
"""

from __future__ import annotations

import os
import queue

import torch

_DISTOPT_META = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _sub_optimizers(optimizer))


def _unwrap(chunk):
    # The bare GPTModel: DDP's own (sharded_)state_dict adds a "module." level to every key.
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_sharded_state_dict(chunks: list) -> dict:
    return {f"chunk{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool, chained_prefix: bool = False):
    """Optimizer tensors are keyed by their parameter's global key, without the `chained_{i}.` prefix a
    ChainedOptimizer would add (megatron's chained_optim_avoid_prefix): so the dense / expert split of the
    optimizer (which depends on EP) does not change the keys, and a checkpoint loads at any EP.
    chained_prefix=True: the older format (same-layout loads only)."""
    if _uses_distributed_optimizer(optimizer):
        if is_loading:
            # A fresh DistributedOptimizer over torch's Adam has no state yet, and its state_dict()
            # asserts one 'step' per group: create (dummy) states so the load template can be built.
            for sub in _sub_optimizers(optimizer):
                if hasattr(sub, "_init_optimizer_states_with_dummy_values"):
                    sub._init_optimizer_states_with_dummy_values()
        return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(_DISTOPT_META))
    metadata = {} if chained_prefix else {"chained_optim_avoid_prefix": True}
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)


def _saved_adam_step(tree) -> float:
    """The Adam step count stored in any param group of the saved optimizer state (all groups share it)."""
    steps = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "param_groups" and isinstance(value, list):
                steps += [float(g["step"]) for g in value if "step" in g]
            else:
                steps.append(_saved_adam_step(value))
    return max(steps, default=0.0)


def _fit_distributed_optimizer_state(loaded: dict, optimizer):
    """Rebuild the per-sub-optimizer load dicts for THIS layout's optimizer from a checkpoint saved at any
    layout: tensors were already loaded into this layout's structure by their global keys; param groups are
    this optimizer's own, with the saved step count."""
    step = _saved_adam_step(loaded)
    subs = _sub_optimizers(optimizer)
    parts = [loaded] if len(subs) == 1 else [loaded[i] for i in range(len(subs))]
    fitted = []
    for sub, part in zip(subs, parts):
        groups = [{k: v for k, v in g.items() if k != "params"} | {"step": step} for g in sub.optimizer.param_groups]
        fitted.append(
            {
                "param_state": part["param_state"],
                "param_state_sharding_type": _DISTOPT_META["distrib_optim_sharding_type"],
                "optimizer": {"param_groups": groups},
            }
        )
    return fitted[0] if len(subs) == 1 else dict(enumerate(fitted))


def _common_steps(tree) -> list:
    """Every `common_step` (the Adam step megatron's non-distributed optimizers save beside the state)."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += [value] if key == "common_step" else _common_steps(value)
    return found


def _fit_optimizer_state(loaded: dict, optimizer):
    """The non-distributed optimizer's load dict for THIS layout from a checkpoint saved at any EP: tensors were
    loaded into this layout's structure by their global keys; the common values (param groups, the step count)
    sit where the saving layout's optimizer nesting put them (a ChainedOptimizer of dense + expert optimizers
    nests by index, a single optimizer does not): param groups are this optimizer's own (hyper-parameters come
    from the config and the LR schedule), and the saved step goes to every sub-optimizer."""
    steps = _common_steps(loaded)
    subs = _sub_optimizers(optimizer)
    if len(subs) == 1:
        parts = [{k: v for k, v in loaded.items() if not isinstance(k, int)}]
    else:
        parts = [loaded[i] for i in range(len(subs))]
    for sub, part in zip(subs, parts):
        torch_sd = part.get("optimizer", part)  # Float16Optimizer nests torch's
        own = sub.state_dict()
        torch_sd["param_groups"] = own.get("optimizer", own)["param_groups"]
        torch_sd["state"].pop("common_step", None)
        if steps:
            torch_sd["state"]["common_step"] = max(steps)
    return parts[0] if len(subs) == 1 else dict(enumerate(parts))


def _saved_with_chained_prefix(path: str) -> bool:
    from megatron.core import dist_checkpointing

    return any(key.startswith("chained_") for key in dist_checkpointing.load_tensors_metadata(path))


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _results_queue_without_a_manager() -> None:
    """megatron-core (0.16.1; the same module global in 0.19) hands a checkpoint write's results back through a
    queue that it keeps in a multiprocessing Manager: a spawned server process that re-imports torch (about
    275 MB, and seconds of CPU at a run's first save on a small box), lives as long as the trainer, and outlives
    a SIGKILLed trainer for good (it ignores SIGTERM too: one orphan per killed run). Our saves are synchronous:
    the results are put and read in this process (megatron's forked writer processes report through a queue
    of their own), so a plain thread queue carries them. Only megatron's async save, which we do not use, needs
    the Manager; with this queue its results would not arrive and megatron would raise "results_queue should
    not be empty". Set once, before megatron creates its own; an existing queue is left as it is."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(path: str, chunks: list, optimizer=None, scheduler=None, extra: dict | None = None) -> None:
    """Write a dist checkpoint of this rank's shards (collective: every rank calls it)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    _results_queue_without_a_manager()

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    model_sd = _model_sharded_state_dict(chunks)
    # A weights-only checkpoint (optimizer=None, e.g. from `megatron-sapo convert`) says so, and its load
    # then leaves the optimizer and LR schedule fresh.
    state = {"model": model_sd, "extra": dict(extra or {}), "has_optimizer": optimizer is not None}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    # Rank 0's RNG, as common (non-sharded) state: the model has no dropout, so this only restores the
    # trainer-side random streams; per-rank TP/EP tracker states are reseeded at init.
    state["rng"] = _rng_state()
    dist_checkpointing.save(state, path)
    dist.barrier()


def load_checkpoint(path: str, chunks: list, optimizer=None, scheduler=None) -> dict:
    """Load into the (already built) model chunks / optimizer / scheduler at this rank's layout; returns the
    `extra` dict given to save_checkpoint."""
    from megatron.core import dist_checkpointing

    model_sd = _model_sharded_state_dict(chunks)
    template = {"model": model_sd}
    if not dist_checkpointing.load_common_state_dict(path).get("has_optimizer", True):
        optimizer = scheduler = None
    if optimizer is not None:
        old_format = not _uses_distributed_optimizer(optimizer) and _saved_with_chained_prefix(path)
        template["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, True, chained_prefix=old_format)
    loaded = dist_checkpointing.load(template, path)
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(loaded["model"][f"chunk{i}"])
    if optimizer is not None:
        state = loaded["optimizer"]
        if _uses_distributed_optimizer(optimizer):
            state = _fit_distributed_optimizer_state(state, optimizer)
        elif not old_format:
            state = _fit_optimizer_state(state, optimizer)
        optimizer.load_state_dict(state)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        torch.set_rng_state(loaded["rng"]["torch"])
    return dict(loaded.get("extra", {}))


def load_weights(path: str, chunks: list) -> None:
    """Only the model weights of a checkpoint (saved at any layout, with or without optimizer): no optimizer,
    scheduler, RNG or caller state is touched (e.g. the KL reference model's weights-only copy)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load({"model": _model_sharded_state_dict(chunks)}, path)
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(loaded["model"][f"chunk{i}"])
