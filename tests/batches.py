"""Synthetic engine batches for the tests (random tokens, a 3-token prompt, responses of growing length,
right padding (token 0) after each response), and the relative difference the comparisons share."""

from __future__ import annotations

import torch


def right_padded_batch(n=4, s=20, vocab=512, seed=0, response=4, advantages=None) -> dict:
    """Sequence i answers with response + 2 i tokens; advantages default to a seeded standard normal."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, s), generator=g)
    mask = torch.zeros(n, s - 1)
    for i in range(n):
        mask[i, 3 : 3 + response + 2 * i] = 1.0
        tokens[i, 3 + response + 2 * i + 1 :] = 0
    adv = torch.randn(n, generator=g) if advantages is None else torch.tensor(advantages)
    return {"tokens": tokens, "loss_mask": mask, "advantages": adv}


def max_rel_diff(got: dict, ref: dict) -> float:
    """Largest max|got - ref| / max|ref| over the tensors of ref (every key of ref must be in got)."""
    return max(float((got[k] - r).abs().max()) / max(float(r.abs().max()), 1e-6) for k, r in ref.items())
