"""Samples -> the engine's batch tensors (right-padded), and mini-batch slicing."""

from __future__ import annotations

import torch

from megatron_sapo.rollout.base import Sample


def collate_samples(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """tokens [N, S] = prompt + response, right-padded; loss_mask and rollout_log_probs [N, S-1] are
    aligned with labels tokens[:, 1:], so index t scores token t+1 (1 on response tokens)."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    n = len(samples)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, width - 1)
    rollout_log_probs = torch.zeros(n, width - 1)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        loss_mask[i, p - 1 : p - 1 + r] = 1.0
        rollout_log_probs[i, p - 1 : p - 1 + r] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
    return {"tokens": tokens, "loss_mask": loss_mask, "rollout_log_probs": rollout_log_probs}


def minibatches(batch: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """k contiguous mini-batches of equal size (the config validated divisibility)."""
    n = batch["tokens"].shape[0]
    if n % k:
        raise ValueError(f"{n} samples do not split into {k} mini-batches")
    size = n // k
    return [{key: v[i * size : (i + 1) * size] for key, v in batch.items()} for i in range(k)]
