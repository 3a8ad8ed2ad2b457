"""Policy losses: per-token loss terms (to be minimised) and metrics, before aggregation.

Each loss takes the clamped log-ratio l = log pi_theta - log pi_old [B, T], advantages broadcast to
[B, T], the float loss mask, and its hyperparameters; it returns (per_token_loss, metrics). Metrics are
0-d tensors over the masked tokens of this batch; no .item() here (hot path).
"""

from __future__ import annotations

import inspect

import torch

from .aggregation import masked_mean
from .registry import Registry

POLICY_LOSSES = Registry("policy loss")

# Hyperparameters each loss reads; compute_policy_loss accepts their union and rejects anything else.
LOSS_HYPERS = {
    "sapo": ("tau_pos", "tau_neg"),
    "grpo": ("eps_low", "eps_high"),
    "gspo": ("eps_low", "eps_high"),
    "gspo_token": ("eps_low", "eps_high"),
}


def loss_defaults(name: str) -> dict[str, float]:
    """The hyperparameter defaults of loss `name` (its function's keyword defaults, the one place they are
    written): what a config that leaves them unset runs with."""
    params = inspect.signature(POLICY_LOSSES.get(name)).parameters
    return {key: params[key].default for key in LOSS_HYPERS[name]}


def sapo_gate(ratio: torch.Tensor, tau: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """SAPO's soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau and its gradient weight w = 4 p (1 - p).

    df/dr = w, so d f(r) / d log pi = w * r; w = 1 at r = 1 for every tau.
    """
    p = torch.sigmoid(tau * (ratio - 1.0))
    return p * 4.0 / tau, 4.0 * p * (1.0 - p)


@POLICY_LOSSES.register("sapo")
def sapo_loss(log_ratio, advantages, loss_mask, tau_pos=1.0, tau_neg=1.05):
    """-f_tau(r) * A, with tau = tau_pos where A > 0 else tau_neg (negative side decays faster)."""
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate, weight = sapo_gate(ratio, tau)
    weight = weight.detach()
    masked = loss_mask > 0
    metrics = {
        "gate_mean": masked_mean(weight, loss_mask),
        "gate_min": torch.where(masked, weight, torch.ones_like(weight)).amin(),
        "gate_low_frac": masked_mean((weight < 0.5).to(weight.dtype), loss_mask),
    }
    return -gate * advantages, metrics


def _hard_clip(ratio, advantages, loss_mask, eps_low, eps_high):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) and the fraction of tokens the clip silenced."""
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped_loss = -ratio * advantages
    clipped_loss = -clipped * advantages
    per_token = torch.maximum(unclipped_loss, clipped_loss)
    r = ratio.detach()
    high = ((r > 1.0 + eps_high) & (advantages > 0)).to(r.dtype)
    low = ((r < 1.0 - eps_low) & (advantages < 0)).to(r.dtype)
    metrics = {
        "clip_frac": masked_mean(high + low, loss_mask),
        "clip_frac_high": masked_mean(high, loss_mask),
        "clip_frac_low": masked_mean(low, loss_mask),
    }
    return per_token, metrics


@POLICY_LOSSES.register("grpo")
def grpo_loss(log_ratio, advantages, loss_mask, eps_low=0.2, eps_high=0.27):
    """Token-level PPO clip."""
    return _hard_clip(torch.exp(log_ratio), advantages, loss_mask, eps_low, eps_high)


def sequence_log_ratio(log_ratio: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio: the masked mean of token log-ratios, [B]."""
    return (log_ratio * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1)


@POLICY_LOSSES.register("gspo")
def gspo_loss(log_ratio, advantages, loss_mask, eps_low=3e-4, eps_high=4e-4):
    """Sequence-level clip on s_i = exp(mean_t l): a clipped sequence loses all its tokens' gradients."""
    seq_ratio = torch.exp(sequence_log_ratio(log_ratio, loss_mask)).unsqueeze(-1).expand_as(log_ratio)
    return _hard_clip(seq_ratio, advantages, loss_mask, eps_low, eps_high)


@POLICY_LOSSES.register("gspo_token")
def gspo_token_loss(log_ratio, advantages, loss_mask, eps_low=3e-4, eps_high=4e-4):
    """s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]: GSPO's value, per-token gradients (and advantages)."""
    seq = sequence_log_ratio(log_ratio, loss_mask).detach().unsqueeze(-1)
    token_ratio = torch.exp(seq + log_ratio - log_ratio.detach())
    return _hard_clip(token_ratio, advantages, loss_mask, eps_low, eps_high)
