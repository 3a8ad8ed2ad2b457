"""Sequence packing for the Megatron passes (`train.pack_sequences`): several sequences per row.

Rollouts are right-padded to the longest sequence of the batch, so a micro-batch that mixes short and long
responses spends much of its compute on padding. Packed, the sequences of this rank's batch fill rows of
`length` positions in their order (next fit, so the outputs come back in the batch's order), and every
micro-batch has the same number of rows (pipeline stages exchange tensors of one shape).

- Attention stays inside each sequence through a block-diagonal causal mask [rows, 1, length, length]
  (True = masked), which megatron's local (non-TE) attention applies as given.
- RoPE positions run on across a row: megatron's rotary embedding ignores position_ids, and a rotary score
  depends only on the query-key distance, which the mask keeps inside one sequence. Packed and padded
  log-probs therefore agree to float rounding (tests/unit/test_packing.py).
- The loss sees sequences again: `unpack_index` [n_mb, length] maps each (sequence, position) of the
  micro-batch to the flat (row, column) of the packed output and `unpack_valid` marks the positions a
  sequence has; the per-sequence inputs (loss mask, old log-probs, advantages, ...) stay [n_mb, length].
- Padding positions attend only to themselves (a row of the mask is never all masked) and carry no loss.
- Routing replay (r2 / r3) packs its per-token expert ids the same way (attach_packed_replay), and routing
  recorded on packed rows is unpacked per sequence (routing.RoutingHandle.collect).
"""

from __future__ import annotations

import torch

from megatron_sapo.megatron.loss_glue import PER_TOKEN_KEYS, fit_width


def sequence_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """Input positions each sequence needs [N]: up to its last loss token (0 without one); later positions
    cannot influence a loss token under causal attention."""
    positions = torch.arange(1, loss_mask.shape[1] + 1).expand_as(loss_mask)
    return torch.where(loss_mask > 0, positions, 0).amax(-1)


def plan_rows(lengths: list[int], length: int, rows_per_microbatch: int) -> list[list[list[int]]]:
    """Next fit in order: micro-batches of at most `rows_per_microbatch` rows, each a list of sequence
    indices whose lengths sum to at most `length`."""
    microbatches, rows, row, used = [], [], [], 0
    for index, n in enumerate(lengths):
        if row and used + n > length:
            rows.append(row)
            row, used = [], 0
            if len(rows) == rows_per_microbatch:
                microbatches.append(rows)
                rows = []
        row.append(index)
        used += n
    rows.append(row)
    microbatches.append(rows)
    return microbatches


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, L, L] bool, True = masked: a position sees the earlier positions of its own segment."""
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    return (~(same & causal)).unsqueeze(1)


def pack_microbatches(batch: dict, rows_per_microbatch: int, length: int) -> list[dict]:
    """This rank's sequences as packed micro-batches (see the module docstring)."""
    lengths = sequence_lengths(batch["loss_mask"]).clamp(max=length).tolist()
    tokens = batch["tokens"]
    out = []
    for plan in plan_rows(lengths, length, rows_per_microbatch):
        ids = [i for row in plan for i in row]
        inputs = torch.zeros(rows_per_microbatch, length, dtype=tokens.dtype)
        labels = torch.zeros_like(inputs)
        # padding: a segment of its own per position, so it attends only to itself
        segments = -1 - torch.arange(length).repeat(rows_per_microbatch, 1)
        index = torch.zeros(len(ids), length, dtype=torch.long)
        valid = torch.zeros(len(ids), length, dtype=torch.bool)
        k = 0
        for r, row in enumerate(plan):
            col = 0
            for i in row:
                n = lengths[i]
                inputs[r, col : col + n], labels[r, col : col + n] = tokens[i, :n], tokens[i, 1 : n + 1]
                segments[r, col : col + n] = k
                index[k, :n] = r * length + col + torch.arange(n)
                valid[k, :n] = True
                col, k = col + n, k + 1
        mb = {
            "tokens": inputs,
            "labels": labels,
            "position_ids": torch.arange(length).expand(rows_per_microbatch, -1).contiguous(),
            "attention_mask": block_causal_mask(segments),
            "unpack_index": index,
            "unpack_valid": valid,
        }
        chosen = torch.tensor(ids, dtype=torch.long)
        mb["sequences"] = chosen  # this rank's sequence indices, in the micro-batch's order
        for key in PER_TOKEN_KEYS:
            if batch.get(key) is not None:
                mb[key] = fit_width(batch[key][chosen].float(), length)
        if batch.get("advantages") is not None:
            mb["advantages"] = batch["advantages"][chosen].float()
        out.append(mb)
    return out


def unpack(packed: torch.Tensor, mb: dict) -> torch.Tensor:
    """Packed per-token outputs [rows, L] (or [rows, L, 2]) -> per sequence [n_mb, L] (or [n_mb, L, 2]);
    positions a sequence does not have are 0. Differentiable (a gather)."""
    flat = packed.reshape(-1, *packed.shape[2:])
    out = flat[mb["unpack_index"]]
    valid = mb["unpack_valid"] if out.dim() == 2 else mb["unpack_valid"].unsqueeze(-1)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def pack_rows(per_sequence: torch.Tensor, mb: dict, filler: torch.Tensor) -> torch.Tensor:
    """The inverse of unpack for inputs: per-sequence values [n_mb, L, ...] laid out in the micro-batch's packed
    rows [rows, L, ...]; positions no sequence covers (padding) hold `filler` [...]."""
    rows, length = mb["tokens"].shape
    flat = filler.expand(rows * length, *filler.shape).clone()
    valid = mb["unpack_valid"]
    flat[mb["unpack_index"][valid]] = per_sequence[valid]
    return flat.view(rows, length, *filler.shape)


def attach_packed_replay(microbatches: list[dict], ids: torch.Tensor, length: int, topk: int) -> None:
    """Routing replay on packed micro-batches: this rank's [n_local, S-1, L, K] replay ids (routing.replay_ids)
    in the packed row layout, so every token is forced to its own sequence's experts."""
    from megatron_sapo.megatron.routing import REPLAY_KEY, replay_ids

    ids = replay_ids(ids, length, topk)
    filler = torch.arange(topk).expand(ids.shape[2], topk)  # padding: experts 0..K-1 in every layer
    for mb in microbatches:
        mb[REPLAY_KEY] = pack_rows(ids[mb["sequences"]], mb, filler)
