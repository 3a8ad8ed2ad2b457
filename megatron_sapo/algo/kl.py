"""Per-token KL estimators between the policy and a reference, from log-probs of sampled tokens."""

from __future__ import annotations

import torch

from .registry import Registry

KL_ESTIMATORS = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(log_probs, ref_log_probs):
    """log pi - log pi_ref: unbiased for KL(pi || ref), high variance, can be negative."""
    return log_probs - ref_log_probs


@KL_ESTIMATORS.register("k2")
def k2(log_probs, ref_log_probs):
    """(log pi - log pi_ref)^2 / 2: biased, low variance, always >= 0."""
    return 0.5 * (log_probs - ref_log_probs) ** 2


@KL_ESTIMATORS.register("k3")
def k3(log_probs, ref_log_probs):
    """exp(ref - pi) - (ref - pi) - 1: unbiased for KL(pi || ref), always >= 0 (Schulman)."""
    # Clamped so one far-off token cannot overflow exp; at |d| = 20 the term is already ~5e8.
    d = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def kl_penalty(log_probs, ref_log_probs, kind="k3"):
    return KL_ESTIMATORS.get(kind)(log_probs, ref_log_probs)
