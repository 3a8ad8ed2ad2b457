"""Context parallelism (parallel.cp > 1): each sequence's positions are split over the CP ranks.

Layout: megatron's load-balanced split, the one its rotary embedding selects for a CP rank
(rope_utils.get_pos_emb_on_this_cp_rank) and TE's context-parallel attention expects. A model input of
length L is cut into 2*cp chunks; CP rank r holds chunks r and 2*cp-1-r, so that every rank does the same
share of causal-attention work.

Who does what:
- engine: micro-batches keep whole rows; `cp_positions` lists this rank's columns, and loss_glue feeds the
  model only those (tokens, labels, position ids).
- attention: with Transformer Engine, TE's own CP attention (GPU). Without TE, megatron-core's local
  DotProductAttention refuses cp > 1, so model.layer_spec puts AllGatherKVAttention (below) in its place:
  the same module plus the key/value exchange of TE's 'all_gather' CP algorithm. It also takes packed rows
  (train.pack_sequences): loss_glue hands it the block-diagonal mask's rows of this rank's queries.
- loss: the last stage's per-token log-probs (and entropy) are gathered back into whole rows over the CP
  group (gather_columns), so the loss, its metrics and the log-prob pass see whole sequences, as at cp=1.
  Every CP rank computes the same loss; the gather's backward keeps each rank's own columns of the
  gradient (nothing summed), so each rank backpropagates the loss once, through its own tokens only, and
  DDP's sum over the dp*cp ranks adds the parts (the scale: loss_glue's docstring).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _positions(length: int, cp: int, rank: int) -> torch.Tensor:
    if length % (2 * cp):
        raise ValueError(f"context parallelism splits a sequence into 2*cp={2 * cp} chunks: length {length}")
    chunk = length // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def local_positions(length: int, cp: int, rank: int) -> torch.Tensor:
    """Columns (LongTensor) of a length-`length` row that CP rank `rank` of `cp` holds, in its local order."""
    return _positions(length, cp, rank).clone()


@functools.lru_cache(maxsize=64)
def _gathered_order(length: int, cp: int) -> torch.Tensor:
    """Index that puts the rows of an all-gather over the CP group (rank 0's positions, rank 1's, ...) back
    into position order."""
    return torch.argsort(torch.cat([_positions(length, cp, r) for r in range(cp)]))


def _gather(x: torch.Tensor, group, output_grad_is_split: bool) -> torch.Tensor:
    """All-gather dim 0 over `group` in position order. output_grad_is_split: the computation after the
    gather runs on every rank's own part (attention: each rank's queries), so the backward sums the
    gradients from every rank (reduce-scatter); otherwise it is duplicated on every rank (the loss) and the
    backward keeps this rank's part."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp = group.size()
    gathered = gather_from_sequence_parallel_region(x, output_grad_is_split, group)
    return gathered.index_select(0, _gathered_order(x.shape[0] * cp, cp).to(x.device))


def gather_columns(output: torch.Tensor, group) -> torch.Tensor:
    """This rank's columns of per-token outputs [b, s/cp, ...] -> whole rows [b, s, ...] on every CP rank,
    differentiably (see the module docstring for the backward)."""
    rows_first = output.transpose(0, 1).contiguous()
    return _gather(rows_first, group, output_grad_is_split=False).transpose(0, 1)


@functools.cache
def all_gather_kv_attention() -> type:
    """The AllGatherKVAttention class (megatron-core is imported on first use, as everywhere here)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class AllGatherKVAttention(DotProductAttention):
        """megatron-core's local DotProductAttention with context parallelism: keys and values of the whole
        sequence are all-gathered over the CP group (the backward reduce-scatters their gradients to their
        owners), and this rank's queries attend causally by their global positions. Numerically the cp=1
        attention: the same matmuls and softmax, over the same keys, with the same masked value.

        Why here and not a compat patch: it is needed wherever TE is absent (CPU, and GPUs without TE), and it
        is a layer spec entry like TE's attention, not a fix of megatron-core code. Built for megatron-core
        0.16.1 (tested) and 0.19 (same constructor and forward arguments)."""

        def __init__(self, config, *args, **kwargs):
            cp = config.context_parallel_size
            config.context_parallel_size = 1  # the parent asserts cp == 1 (no KV exchange): we add one
            try:
                super().__init__(config, *args, **kwargs)
            finally:
                config.context_parallel_size = cp
            pg_collection = kwargs.get("pg_collection")
            self.cp_group = getattr(pg_collection, "cp", None)
            if self.cp_group is None:
                from megatron.core import parallel_state

                self.cp_group = parallel_state.get_context_parallel_group()
            # The fused causal-softmax kernel (bf16 on GPU) assumes as many keys as queries; the torch softmax
            # applies the explicit mask built below.
            self.scale_mask_softmax.scaled_masked_softmax_fusion = False

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            cp = self.cp_group.size()
            if cp == 1:
                return super().forward(query, key, value, attention_mask, *args, **kwargs)
            length = query.shape[0] * cp
            key = _gather(key, self.cp_group, output_grad_is_split=True)
            value = _gather(value, self.cp_group, output_grad_is_split=True)
            if attention_mask is None:  # causal by global position
                q_positions = _positions(length, cp, self.cp_group.rank()).to(query.device)
                attention_mask = (torch.arange(length, device=query.device)[None, :] > q_positions[:, None])[None, None]
            # else packed rows (packing.py): the block-diagonal mask's rows of this rank's queries, all keys
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    return AllGatherKVAttention
