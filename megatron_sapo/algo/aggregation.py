"""Reduce per-token loss terms [B, T] to a scalar with global denominators.

Each mode is a plain sum over the local batch divided by a denominator of the *whole step*
(all micro-batches, all data-parallel ranks). Summing the losses of any split of a batch therefore
reproduces the full-batch loss and gradient exactly.
"""

from __future__ import annotations

import torch

from .registry import Registry

AGGREGATIONS = Registry("loss aggregation")


def count_sequences(loss_mask: torch.Tensor) -> torch.Tensor:
    """Sequences with at least one loss token (an empty response has nothing to average)."""
    return (loss_mask.sum(dim=-1) > 0).sum()


def _safe(denominator: torch.Tensor | float) -> torch.Tensor | float:
    # An all-masked batch gives 0 / 1 = 0 instead of 0 / 0 = NaN.
    return denominator.clamp(min=1) if torch.is_tensor(denominator) else max(float(denominator), 1.0)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(per_token, loss_mask, num_sequences=None, num_tokens=None):
    """The paper's 1/G sum_i 1/|y_i| sum_t: every sequence weighs the same, whatever its length."""
    lengths = loss_mask.sum(dim=-1)
    per_seq = (per_token * loss_mask).sum(dim=-1) / lengths.clamp(min=1)
    denominator = count_sequences(loss_mask) if num_sequences is None else num_sequences
    return per_seq.sum() / _safe(denominator)


@AGGREGATIONS.register("token-mean")
def token_mean(per_token, loss_mask, num_sequences=None, num_tokens=None):
    """DAPO style: every token of the step weighs the same."""
    denominator = loss_mask.sum() if num_tokens is None else num_tokens
    return (per_token * loss_mask).sum() / _safe(denominator)


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(per_token, loss_mask, num_sequences=None, num_tokens=None):
    """Token sums averaged over sequences (longer responses weigh more)."""
    denominator = count_sequences(loss_mask) if num_sequences is None else num_sequences
    return (per_token * loss_mask).sum() / _safe(denominator)


def aggregate(per_token, loss_mask, agg="seq-mean-token-mean", num_sequences=None, num_tokens=None):
    return AGGREGATIONS.get(agg)(per_token, loss_mask, num_sequences=num_sequences, num_tokens=num_tokens)


def masked_mean(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (values * loss_mask).sum() / loss_mask.sum().clamp(min=1)
