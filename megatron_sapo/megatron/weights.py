"""Unsharded (global) views of a model's parameters or gradients, from megatron's own shard metadata.

Every parameter's place in the global tensor comes from the model's `sharded_state_dict()` (the same
metadata dist_checkpointing uses): TP slices, PP layer offsets, EP expert offsets, and the SwiGLU
factory that stores fc1 as [gate; up] globally. So a global tensor is layout-independent: gathered at
TP2xPP2xEP2 it equals the one gathered at TP1.

Two views:
- `gather_global`: megatron's checkpoint keys, layers (and experts) stacked on leading axes (e.g.
  `decoder.layers.mlp.experts.experts.linear_fc1.weight` [layers, experts, 2*ffn, hidden]), assembled on every
  rank. For tests, conversion and small models: every rank holds the whole model.
- `stream_global`: the weight sync's path. One tensor per layer (and expert) ("units", named
  `decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight`), gathered bucket by bucket onto one
  rank, so that rank holds at most one bucket (about `bucket_mb`, or one unit when a unit is larger) and the
  others hold nothing beyond their own shards.
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


def _several_ranks(group=None) -> bool:
    """World size 1 (a gloo world of one, or none) needs no collective: gather_object would still pickle."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


def _param_or_grad(what: str) -> Callable[[torch.nn.Parameter], torch.Tensor]:
    def tensor_of(p):
        if what == "param":
            return p.detach()
        grad = getattr(p, "main_grad", None)  # DDP accumulates into main_grad
        grad = p.grad if grad is None else grad
        return torch.zeros_like(p) if grad is None else grad.detach()

    return tensor_of


def gather_global(chunks: list, what: str = "param") -> dict[str, torch.Tensor]:
    """Full global tensors (float32, CPU) under megatron's stacked checkpoint keys, on every rank.
    what: "param" or "grad" (main_grad under DDP)."""
    mine = [
        (key, shape, index, piece.float().cpu().clone())
        for key, shape, index, piece, main in _sharded_pieces(chunks, _param_or_grad(what))
        if main
    ]
    everyone = [mine]
    if _several_ranks():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    full: dict[str, torch.Tensor] = {}
    for pieces in everyone:
        for key, shape, index, piece in pieces:
            if key not in full:
                full[key] = torch.zeros(shape)
            full[key][index] = piece.reshape(full[key][index].shape)
    return full


# ----------------------------------------------------------------------------------------------------------
# units: one tensor per layer (and expert)
# ----------------------------------------------------------------------------------------------------------
def unit_name(key: str, points: tuple[int, ...]) -> str:
    """Megatron checkpoint key + indices on its stacked axes -> the per-layer (per-expert) name that
    rollout/weights.megatron_to_hf understands."""
    rest = list(points)
    if rest and key.startswith("decoder.layers.") and not key.split(".")[2].isdigit():
        key = f"decoder.layers.{rest.pop(0)}.{key[len('decoder.layers.') :]}"
    if rest and ".mlp.experts.experts." in key:
        head, tail = key.split(".mlp.experts.experts.")
        key = f"{head}.mlp.experts.local_experts.{rest.pop(0)}.{tail}"
    if rest:
        raise ValueError(f"unexpected stacked axes {points} on megatron weight '{key}'")
    return key


def local_units(chunks: list, tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] | None = None) -> Iterator:
    """(unit name, unit shape, index of the local piece inside the unit, local piece, is_main_replica) for
    every parameter shard of this rank."""
    for key, shape, index, piece, main in _sharded_pieces(chunks, tensor_of or _param_or_grad("param")):
        lead = sum(1 for i in index if isinstance(i, int))  # stacked (layer / expert) axes come first
        yield unit_name(key, tuple(index[:lead])), tuple(shape[lead:]), tuple(index[lead:]), piece, main


def shards_by_unit(chunks: list, main_only: bool = False) -> dict[str, tuple[tuple, list]]:
    """This rank's parameter shards grouped by unit: name -> (unit shape, [(index in the unit, piece), ...]) (a
    SwiGLU fc1 unit has a gate and an up slice on each rank). main_only: one copy of each element across ranks
    (DP / expert-DP replicas are not main)."""
    grouped: dict[str, tuple[tuple, list]] = {}
    for name, shape, index, piece, main in local_units(chunks, lambda p: p.data):
        if main or not main_only:
            grouped.setdefault(name, (shape, []))[1].append((index, piece))
    return grouped


@torch.no_grad()
def fill_units(
    grouped: dict[str, tuple[tuple, list]], make_unit: Callable[[str, tuple, torch.dtype], torch.Tensor]
) -> int:
    """Set every shard of shards_by_unit(...) from whole units built one at a time by make_unit(name, shape, dtype)
    (about one unit in memory at a time); returns the number of shards written."""
    count = 0
    for name, (shape, shards) in grouped.items():
        full = make_unit(name, shape, shards[0][1].dtype)
        for index, piece in shards:
            piece.copy_(full[index].reshape(piece.shape))
            count += 1
    return count


def _bucket_plan(units: dict[str, tuple], bucket_mb: float, group) -> list[list[tuple[str, tuple, torch.dtype]]]:
    """The same list of buckets on every rank: all ranks' units (name, shape, dtype) in rank order, cut
    into groups of about bucket_mb MB (a unit larger than that is a bucket of its own)."""
    everyone = [units]
    if _several_ranks(group):
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, units, group=group)
    from megatron_sapo.rollout.base import cut_by_size

    merged: dict[str, tuple] = {}
    for rank_units in everyone:
        for name, meta in rank_units.items():
            merged.setdefault(name, meta)
    units = [(name, shape, dtype) for name, (shape, dtype) in merged.items()]
    return list(cut_by_size(units, lambda unit: torch.Size(unit[1]).numel() * unit[2].itemsize, bucket_mb))


@torch.no_grad()
def stream_global(
    chunks: list, bucket_mb: float, dst: int = 0, group=None, grouped: dict | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the model's parameters as buckets of whole units (in the parameters' own dtype, on the CPU) on
    global rank `dst`, and an empty dict per bucket elsewhere. A collective: every rank of `group` (default:
    the world) must run the generator to its end, in step. grouped: shards_by_unit(chunks, main_only=True)
    computed earlier (its pieces are views of the parameters), to skip rebuilding it."""
    grouped = shards_by_unit(chunks, main_only=True) if grouped is None else grouped
    units = {name: (shape, shards[0][1].dtype) for name, (shape, shards) in grouped.items()}
    several = _several_ranks(group)
    rank = dist.get_rank() if several else dst
    for bucket in _bucket_plan(units, bucket_mb, group):
        mine = [
            (name, index, piece.cpu()) for name, _, _ in bucket if name in grouped for index, piece in grouped[name][1]
        ]
        everyone = [mine]
        if several:
            everyone = [None] * dist.get_world_size(group) if rank == dst else None
            dist.gather_object(mine, everyone, dst=dst, group=group)
        if rank != dst:
            yield {}
            continue
        full = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in bucket}
        filled = dict.fromkeys(full, 0)
        for rank_pieces in everyone:
            for name, index, piece in rank_pieces:
                full[name][index] = piece.reshape(full[name][index].shape)
                filled[name] += piece.numel()
        short = [name for name, t in full.items() if filled[name] != t.numel()]
        if short:  # main replicas tile each unit exactly; anything else is a sharding-metadata bug
            raise RuntimeError(f"weight gather: units not covered exactly once by the ranks' shards: {short[:5]}")
        yield full


@torch.no_grad()
def load_global(chunks: list, full: dict[str, torch.Tensor]) -> int:
    """Copy global tensors into this rank's parameter shards; returns the number of shards written."""
    count = 0
    for key, _, index, piece, _ in _sharded_pieces(chunks, lambda p: p.data):
        piece.copy_(full[key][index].reshape(piece.shape))
        count += 1
    return count
