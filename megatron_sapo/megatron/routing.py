"""MoE routing capture and routing replay, per model, on megatron-core's RouterReplay seam.

megatron-core (0.16.1 and later) passes `TopKRouter.router_replay` to `topk_routing_with_score_function`,
which calls `router_replay.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)` for
the top-k decision. megatron's own RouterReplay keeps every instance in a class-level global list (and is
only created behind `moe_enable_routing_replay`), so instead each TopKRouter of a model gets a `_Slot` owned
by that model's `RoutingHandle`: no global state, nothing shared between two engines in one process.

A slot, per forward of a micro-batch:
  * replay: takes the target top-k ids of its layer for the micro-batch's tokens and gathers the router
    scores at them, exactly as megatron's REPLAY_FORWARD does; the softmax over the replayed experts' logits
    follows in megatron, so the router still gets gradients through the replayed experts' probabilities;
  * otherwise the default top-k (free routing);
  * record: keeps the ids used, the normalised top-k probabilities and the router entropy.

Activation recompute (model.recompute_granularity): megatron's tensor_parallel.checkpoint runs a layer's
forward under no_grad and again, with grad, during backward. In a training pass a slot keeps the ids each
checkpointed forward used (per slot, in micro-batch order) and the recomputed forward takes them back
(backward visits a layer's micro-batches in forward order, also under 1F1B / interleaved pipelining, where
`current` already names a later micro-batch): the recompute routes exactly as the forward did, replayed or
free, and records nothing. (Transformer Engine's te_checkpoint, used only with fp8 / fp4, is not covered.)

Routing tensors use the batch's layout: ids [N, S-1, L, K] (L = num_layers of the model, global 0-based
layer index; -1 where a layer is dense or a position was not routed), aligned with log-prob index t (the
routing of input token tokens[:, t]). Capture restores that order from what each rank routes: a token
block [s_local * b] in sequence-major order, the SP shard of the sequence under TP+SP, this PP stage's
layers, this DP rank's rows, and under context parallelism this CP rank's columns (context_parallel.py: two
chunks of each row, which the SP shard then splits). Replay takes the same tokens out of the batch layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

REPLAY_KEY = "replay_routing"  # batch / micro-batch key of the [N, S-1, L, K] ids to force


class _Slot:
    """Stands where megatron puts a RouterReplay (duck-typed: get_replay_topk)."""

    def __init__(self, handle: RoutingHandle, chunk: int, layer: int, router):
        self.handle, self.chunk, self.layer = handle, chunk, layer
        cfg = router.config
        self.softmax_logits = router.score_function == "softmax" and not cfg.moe_router_pre_softmax
        self.pending: list[torch.Tensor] = []  # ids of checkpointed forwards whose recompute is still due

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        h = self.handle
        checkpointed = h.training and h.is_checkpointing()
        if checkpointed and torch.is_grad_enabled():  # the recompute during backward (module docstring)
            if not self.pending:
                raise RuntimeError(f"layer {self.layer}: activation recompute without a recorded forward")
            ids = self.pending.pop(0).to(scores.device)
            h.recomputed += 1
            return scores.gather(1, ids), ids
        mb_index, mb = h.current.get(self.chunk, (None, None))
        target = mb.get(REPLAY_KEY) if mb is not None else None
        if target is not None:
            ids = h.local_tokens(target[:, :, self.layer, :], mb.get("cp_positions")).to(scores.device)
            values = scores.gather(1, ids)
        else:
            values, ids = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if checkpointed:  # its first forward (no_grad inside the checkpoint): the recompute will want these
            self.pending.append(ids.detach())
        if h.recording and mb_index is not None:
            with torch.no_grad():
                s = scores.detach().float()
                p = torch.softmax(s, -1) if self.softmax_logits else s / s.sum(-1, keepdim=True).clamp_min(1e-20)
                entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
                top = p.gather(1, ids)
                top = top / top.sum(-1, keepdim=True).clamp_min(1e-20)
            packed = mb if "unpack_index" in mb else None  # packed rows: collect maps them back to sequences
            h.records.append((mb_index, self.layer, ids.detach().clone(), top, entropy, packed))
        return values, ids


def _moe_layer_pattern(tcfg) -> list[int]:
    freq = getattr(tcfg, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(tcfg.num_layers)]
    return list(freq)


class RoutingHandle:
    """Routing capture / replay for one model (all its local chunks). Build with `attach`."""

    def __init__(self, chunks: list, tcfg, par):
        from megatron.core.tensor_parallel.random import is_checkpointing
        from megatron.core.transformer.moe.router import TopKRouter

        self.is_checkpointing = is_checkpointing
        self.num_layers, self.topk = tcfg.num_layers, tcfg.moe_router_topk
        self.moe_layers = [i for i, f in enumerate(_moe_layer_pattern(tcfg)) if f]
        self.par = par
        self.sp_size = par.cfg.tp if tcfg.sequence_parallel else 1
        self.sp_rank = par.tp_rank if tcfg.sequence_parallel else 0
        self.cp_size, self.cp_rank = par.cfg.cp, par.cp_rank
        self.slots: list[_Slot] = []
        for c, chunk in enumerate(chunks):
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    if module.layer_number is None:
                        raise RuntimeError("TopKRouter without a layer number")
                    slot = _Slot(self, c, module.layer_number - 1, module)
                    module.router_replay = slot  # the seam: see the module docstring
                    self.slots.append(slot)
        self.current: dict[int, tuple[int, dict]] = {}
        self.recording = self.training = False
        self.records: list = []
        self.recomputed = 0  # router calls served to activation recompute in the current pass

    @classmethod
    def attach(cls, chunks: list, tcfg, par) -> RoutingHandle | None:
        """A handle for an MoE model; None for a dense one."""
        if not getattr(tcfg, "num_moe_experts", None):
            return None
        return cls(chunks, tcfg, par)

    # -- per micro-batch ----------------------------------------------------------------------------------
    def local_tokens(self, ids_bsk: torch.Tensor, cp_columns: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, K] ids of a micro-batch -> the [s_local * b, K] rows this rank routes (sequence-major): its
        CP columns (the micro-batch's cp_positions) when given, then its SP shard of them."""
        if cp_columns is not None:
            ids_bsk = ids_bsk.index_select(1, cp_columns.to(ids_bsk.device))
        b, s, k = ids_bsk.shape
        per = s // self.sp_size
        part = ids_bsk[:, self.sp_rank * per : (self.sp_rank + 1) * per]
        return part.transpose(0, 1).reshape(-1, k).long()

    def track(self, iterator, chunk: int):
        """Wrap a chunk's micro-batch iterator: the slots of that chunk see which micro-batch runs."""
        for index, mb in enumerate(iterator):
            self.current[chunk] = (index, mb)
            yield mb
        self.current.pop(chunk, None)

    # -- a pass -------------------------------------------------------------------------------------------
    def begin(self, record: bool, training: bool = False) -> None:
        """Start a pass: `record` its routing; `training`: a forward-backward (recompute may follow)."""
        self.recording, self.training, self.records, self.current = record, training, [], {}
        self.recomputed = 0
        for slot in self.slots:
            slot.pending = []

    def end(self) -> None:
        self.recording, self.training, self.current = False, False, {}
        for slot in self.slots:
            slot.pending = []

    def collect(self, n: int, seq: int, length: int, micro_batch_size: int) -> dict:
        """The recorded routing of the pass as full-batch tensors on every rank: ids [N, S-1, L, K] (int16,
        -1 = none), probs [N, S-1, L, K] and entropy [N, S-1, L] (float32), plus moe_layers."""
        par, k, layers = self.par, self.topk, self.num_layers
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        n_local = n // par.dp
        # ids + 1 (0 = not recorded) | probs | entropy; ranks fill disjoint parts, summed below
        buf = torch.zeros(n_local, length, layers, 2 * k + 1, device=device)
        columns = torch.arange(length)  # this rank's columns, in the order it routes them
        if self.cp_size > 1:
            from megatron_sapo.megatron.context_parallel import local_positions

            columns = local_positions(length, self.cp_size, self.cp_rank)
        per = len(columns) // self.sp_size
        cols = columns[self.sp_rank * per : (self.sp_rank + 1) * per]  # CPU: indexes buf (any device) and full
        for mb_index, layer, ids, top, entropy, packed_mb in self.records:
            b = ids.shape[0] // per
            values = torch.cat([ids.float() + 1, top, entropy.unsqueeze(-1)], -1).view(per, b, -1).transpose(0, 1)
            if packed_mb is None:
                rows = slice(mb_index * micro_batch_size, mb_index * micro_batch_size + b)
                buf[rows, cols, layer] = values.to(device)
            else:  # this rank's columns of packed rows -> its part of each sequence (0 elsewhere, summed below)
                from megatron_sapo.megatron.packing import unpack

                full = torch.zeros(b, length, values.shape[-1])
                full[:, cols] = values.cpu()
                buf[packed_mb["sequences"].to(device), :, layer] = unpack(full, packed_mb).to(device)
        self.records = []
        if self.sp_size > 1:
            dist.all_reduce(buf, group=par.tp_group)
        if self.cp_size > 1:
            dist.all_reduce(buf, group=par.cp_group)
        if par.cfg.pp > 1:
            dist.all_reduce(buf, group=par.pp_group)
        if par.dp > 1:
            parts = [torch.empty_like(buf) for _ in range(par.dp)]
            dist.all_gather(parts, buf, group=par.dp_group)
            buf = torch.cat(parts, 0)
        buf = buf.cpu()
        width = min(length, seq - 1)
        ids = torch.full((n, seq - 1, layers, k), -1, dtype=torch.int16)  # compact: expert ids < 32768
        probs = torch.zeros(n, seq - 1, layers, k)
        entropy = torch.zeros(n, seq - 1, layers)
        ids[:, :width] = (buf[:, :width, :, :k].round() - 1).to(torch.int16)
        probs[:, :width] = buf[:, :width, :, k : 2 * k]
        entropy[:, :width] = buf[:, :width, :, 2 * k]
        return {"ids": ids, "probs": probs, "entropy": entropy, "moe_layers": list(self.moe_layers)}


def replay_ids(ids: torch.Tensor, length: int, topk: int) -> torch.Tensor:
    """[n, S-1, L, K] replay ids cut / padded to `length` positions. Positions without a routing (-1, e.g.
    padding) get experts 0..K-1: they carry no loss."""
    ids = ids.long()
    if ids.shape[1] >= length:
        ids = ids[:, :length]
    else:
        pad = torch.full((ids.shape[0], length - ids.shape[1], *ids.shape[2:]), -1, dtype=torch.long)
        ids = torch.cat([ids, pad], 1)
    filler = torch.arange(topk).expand_as(ids)
    return torch.where((ids < 0).any(-1, keepdim=True), filler, ids)


def attach_replay(microbatches: list[dict], ids: torch.Tensor, micro_batch_size: int, length: int, topk: int):
    """Put this rank's [n_local, S-1, L, K] replay ids on its micro-batches, one sequence per row (replay_ids).
    Packed micro-batches take theirs from packing.attach_packed_replay."""
    ids = replay_ids(ids, length, topk)
    for i, mb in enumerate(microbatches):
        mb[REPLAY_KEY] = ids[i * micro_batch_size : i * micro_batch_size + mb["tokens"].shape[0]].contiguous()
    return microbatches


def collate_rollout_routing(samples: list, width: int, num_layers: int, topk: int) -> torch.Tensor | None:
    """Sample.routed_experts ([tokens, layers, topk]: the rollout engine's routing of each input token of
    prompt + response) -> replay ids [N, width - 1, L, K] in the batch layout (position t = input token t;
    -1 past the reported tokens). None when any sample lacks it (e.g. a dense model or an engine without it)."""
    if not samples or any(getattr(s, "routed_experts", None) is None for s in samples):
        return None
    out = torch.full((len(samples), width - 1, num_layers, topk), -1, dtype=torch.int16)
    for i, s in enumerate(samples):
        routed = torch.as_tensor(s.routed_experts).long()
        if routed.dim() != 3 or routed.shape[1:] != (num_layers, topk):
            raise ValueError(f"routed_experts of shape {tuple(routed.shape)}, expected [tokens, {num_layers}, {topk}]")
        count = min(routed.shape[0], width - 1)
        out[i, :count] = routed[:count]
    return out
