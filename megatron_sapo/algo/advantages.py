"""Group-based advantages: one scalar per sample, from the rewards of its prompt's group."""

from __future__ import annotations

import torch

from .registry import Registry

ADVANTAGES = Registry("advantage estimator")


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample group size, group mean and group sum, for arbitrary (unsorted) group ids."""
    _, index = torch.unique(group_ids, return_inverse=True)
    groups = int(index.max()) + 1  # once per step, outside the hot path
    count = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, torch.ones_like(rewards))
    total = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, rewards)
    return index, count[index], total[index] / count[index], total[index]


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards, group_ids, eps=1e-6):
    """(R - mean_g) / (std_g + eps), std with Bessel's correction; a group of one gets 0."""
    index, count, mean, _ = _group_stats(rewards, group_ids)
    centred = rewards - mean
    group_sq = torch.zeros(int(index.max()) + 1, dtype=rewards.dtype).index_add_(0, index, centred**2)
    std = torch.sqrt(group_sq[index] / (count - 1).clamp(min=1))
    return torch.where(count > 1, centred / (std + eps), torch.zeros_like(rewards))


@ADVANTAGES.register("drgrpo")
def drgrpo_advantages(rewards, group_ids, eps=1e-6):
    """Dr. GRPO: R - mean_g, without the std division (no difficulty re-weighting)."""
    _, _, mean, _ = _group_stats(rewards, group_ids)
    return rewards - mean


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards, group_ids, eps=1e-6):
    """Leave-one-out baseline: R_i - mean_{j != i} R_j; a group of one gets 0."""
    _, count, _, total = _group_stats(rewards, group_ids)
    others = (total - rewards) / (count - 1).clamp(min=1)
    return torch.where(count > 1, rewards - others, torch.zeros_like(rewards))
