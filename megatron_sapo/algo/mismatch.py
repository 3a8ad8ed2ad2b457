"""Train/inference mismatch: truncated importance weights and the mismatch metrics of SAPO.md.

d = log pi_old - log pi_rollout per token: pi_old is the trainer's recomputation, pi_rollout what the
rollout engine reported for the same tokens.
"""

from __future__ import annotations

import math

import torch

from .aggregation import masked_mean


def truncated_is_weights(old_log_probs, rollout_log_probs, loss_mask, cap, level="token"):
    """min(pi_old / pi_rollout, cap), per token or per sequence (product over its tokens); detached."""
    d = ((old_log_probs - rollout_log_probs) * loss_mask).detach()
    if level == "token":
        log_w = d
    elif level == "sequence":
        log_w = d.sum(-1, keepdim=True).expand_as(d)
    else:
        raise ValueError(f"unknown truncated-IS level '{level}'; valid: sequence, token")
    # Clamp in log space first: exp of a long sequence's summed log-ratio would overflow.
    return torch.exp(log_w.clamp(max=math.log(cap)))


def mismatch_metrics(old_log_probs, rollout_log_probs, loss_mask):
    """k3 KL estimate mean(exp(d) - 1 - d), fraction of tokens with |d| > ln 2, mean |d|."""
    d = (old_log_probs - rollout_log_probs).detach().clamp(-20.0, 20.0)
    return {
        "kl_rollout_k3": masked_mean(torch.exp(d) - 1.0 - d, loss_mask),
        "mismatch_frac_ln2": masked_mean((d.abs() > math.log(2.0)).to(d.dtype), loss_mask),
        "mismatch_abs_mean": masked_mean(d.abs(), loss_mask),
    }
