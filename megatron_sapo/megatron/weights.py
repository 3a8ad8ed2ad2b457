"""Unsharded (global) views of a model's parameters or gradients, from megatron's own shard metadata.

Every parameter's place in the global tensor comes from the model's `sharded_state_dict()` (the same
metadata dist_checkpointing uses): TP slices, PP layer offsets, EP expert offsets, and the SwiGLU
factory that stores fc1 as [gate; up] globally. So a global tensor is layout-independent: gathered at
TP2xPP2xEP2 it equals the one gathered at TP1.

Keys are megatron's checkpoint keys (e.g. `decoder.layers.0.mlp.experts.experts.linear_fc1.weight` with a
leading expert axis, or `...local_experts.3.linear_fc1.weight`). `gather_global` assembles the whole model
on every rank, or with `dst` on that rank only (the others send their shards and keep no copy): the weight
sync uses dst=0. Either way one rank holds the full float32 model at once (large models need a streamed,
bucketed gather; not built yet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist


def _leaves(tree) -> Iterator:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _param_of(data: torch.Tensor, params: dict[int, torch.nn.Parameter]):
    if id(data) in params:
        return params[id(data)]
    for p in params.values():  # a view of a parameter: match storage and shape
        if data.data_ptr() == p.data_ptr() and data.shape == p.shape:
            return p
    return None


def _sharded_pieces(chunks: list, tensor_of: Callable[[torch.nn.Parameter], torch.Tensor]):
    """(key, global_shape, index into the global tensor, local piece, is_main_replica) for every
    parameter shard of this rank; `tensor_of(param)` picks what to read/write (the param, its grad)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    for chunk in chunks:
        module = _unwrap(chunk)
        params = {id(p): p for p in module.parameters()}
        for leaf in _leaves(module.sharded_state_dict()):
            if isinstance(leaf, ShardedTensorFactory):
                param = _param_of(leaf.data, params)
                if param is None:
                    continue
                built = leaf.build_fn(leaf.key, tensor_of(param), leaf.replica_id, None)
                shards = [s for s in _leaves(built) if isinstance(s, ShardedTensor)]
            elif isinstance(leaf, ShardedTensor):
                param = _param_of(leaf.data, params)
                if param is None:
                    continue
                shards = [(leaf, tensor_of(param))]
            else:
                continue
            for item in shards:
                sh, piece = item if isinstance(item, tuple) else (item, item.data)
                yield sh.key, tuple(sh.global_shape), _index(sh), piece, is_main_replica(sh.replica_id)


def _index(sh) -> tuple:
    """Index of a ShardedTensor's local data in its global tensor (leading prepended axes are points)."""
    lead = sh.prepend_axis_num
    points = tuple(sh.global_offset[:lead])
    slices = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[lead:], sh.local_shape))
    return points + slices


def gather_global(chunks: list, what: str = "param", dst: int | None = None) -> dict[str, torch.Tensor]:
    """Full global tensors (float32, CPU) on every rank, or only on global rank `dst` ({} elsewhere).
    what: "param" or "grad" (main_grad under DDP)."""

    def tensor_of(p):
        if what == "param":
            return p.detach()
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        return torch.zeros_like(p) if grad is None else grad.detach()

    mine = [
        (key, shape, index, piece.float().cpu().clone())
        for key, shape, index, piece, main in _sharded_pieces(chunks, tensor_of)
        if main
    ]
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
    if dist.is_initialized() and dst is not None:
        is_dst = dist.get_rank() == dst
        dist.gather_object(mine, everyone if is_dst else None, dst=dst)
        if not is_dst:
            return {}
    elif dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    full: dict[str, torch.Tensor] = {}
    for pieces in everyone:
        for key, shape, index, piece in pieces:
            if key not in full:
                full[key] = torch.zeros(shape)
            full[key][index] = piece.reshape(full[key][index].shape)
    return full


@torch.no_grad()
def load_global(chunks: list, full: dict[str, torch.Tensor]) -> int:
    """Copy global tensors into this rank's parameter shards; returns the number of shards written."""
    count = 0
    for key, _, index, piece, _ in _sharded_pieces(chunks, lambda p: p.data):
        piece.copy_(full[key][index].reshape(piece.shape))
        count += 1
    return count
