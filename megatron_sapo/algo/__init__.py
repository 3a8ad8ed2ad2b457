"""SAPO, GRPO and GSPO in pure torch: tensors in, (loss, metrics as 0-d tensors) out.

No torch.distributed and no megatron here: the Megatron glue (megatron_sapo/megatron/) passes the
global denominators of the step, so that any split of the batch sums to the same loss and gradient.
"""

from __future__ import annotations

import torch

from .advantages import ADVANTAGES
from .aggregation import AGGREGATIONS, aggregate, count_sequences, masked_mean
from .kl import KL_ESTIMATORS, kl_penalty
from .losses import LOSS_HYPERS, POLICY_LOSSES, loss_defaults, sapo_gate, sequence_log_ratio
from .mismatch import mismatch_metrics, truncated_is_weights

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "compute_advantages",
    "compute_policy_loss",
    "count_sequences",
    "kl_penalty",
    "loss_defaults",
    "masked_mean",
    "mismatch_metrics",
    "sapo_gate",
    "sequence_log_ratio",
    "truncated_is_weights",
]

# Log-ratios beyond +-20 (a ratio of 5e8) only arise from broken inputs; clamping keeps exp finite.
# The gradient there is ~0 anyway: above +20 SAPO's gate weight vanishes and GRPO/GSPO clip; below -20 every
# loss scales it by r < 2e-9.
LOG_RATIO_CLAMP = 20.0
_KNOWN_HYPERS = sorted({h for hypers in LOSS_HYPERS.values() for h in hypers})


def _masked_extreme(values, masked, kind):
    """Max or min over masked tokens; an empty batch reports 1 (ratio "unchanged"), not +-inf."""
    fill = float("-inf") if kind == "max" else float("inf")
    picked = torch.where(masked, values, torch.full_like(values, fill))
    extreme = picked.amax() if kind == "max" else picked.amin()
    return torch.where(masked.any(), extreme, torch.ones_like(extreme))


def _ratio_metrics(log_ratio, loss_mask):
    ratio = torch.exp(log_ratio.detach())
    masked = loss_mask > 0
    mean = masked_mean(ratio, loss_mask)
    return {
        "ratio_mean": mean,
        "ratio_std": torch.sqrt(masked_mean((ratio - mean) ** 2, loss_mask)),
        "ratio_max": _masked_extreme(ratio, masked, "max"),
        "ratio_min": _masked_extreme(ratio, masked, "min"),
        # k3 estimate of KL(pi_old || pi_theta) on the sampled tokens: r - 1 - log r.
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio.detach(), loss_mask),
    }


def compute_policy_loss(
    name,
    log_probs,
    old_log_probs,
    advantages,
    loss_mask,
    *,
    agg="seq-mean-token-mean",
    num_sequences=None,
    num_tokens=None,
    is_weights=None,
    ref_log_probs=None,
    kl_coef=0.0,
    kl_type="k3",
    entropy=None,
    entropy_coef=0.0,
    **hyper,
):
    """Policy loss (to minimise) of `name` in {sapo, grpo, gspo, gspo_token}, aggregated by `agg`.

    log_probs, old_log_probs, loss_mask: [B, T]; advantages: [B] or [B, T]. num_sequences / num_tokens:
    the global denominators of the whole step (default: this batch's). is_weights: per-token truncated
    importance weights (treated as constants). A KL penalty to `ref_log_probs` and an entropy bonus are
    added per token before aggregation. Returns (loss, metrics: dict of 0-d tensors).
    """
    loss_fn = POLICY_LOSSES.get(name)
    unknown = sorted(set(hyper) - set(_KNOWN_HYPERS))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for loss '{name}'; valid: {_KNOWN_HYPERS}")
    used = {k: v for k, v in hyper.items() if k in LOSS_HYPERS[name]}
    mask = loss_mask.to(log_probs.dtype)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    adv = adv.to(log_probs.dtype).expand_as(log_probs)
    log_ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)

    per_token, metrics = loss_fn(log_ratio, adv, mask, **used)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    if kl_coef:
        if ref_log_probs is None:
            raise ValueError("kl_coef > 0 needs ref_log_probs (the reference model's log-probs)")
        kl = kl_penalty(log_probs, ref_log_probs, kl_type)
        per_token = per_token + kl_coef * kl
        metrics["kl_ref"] = masked_mean(kl.detach(), mask)
    if entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the per-token entropy")
        per_token = per_token - entropy_coef * entropy
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
    loss = aggregate(per_token, mask, agg, num_sequences=num_sequences, num_tokens=num_tokens)
    metrics.update(_ratio_metrics(log_ratio, mask))
    return loss, metrics


def compute_advantages(name, rewards, group_ids, eps=1e-6):
    """Per-sample advantages [N] from rewards [N] and the prompt-group id of each sample [N]."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    group_ids = torch.as_tensor(group_ids)
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-d")
    if rewards.numel() == 0:
        return rewards.clone()
    return ADVANTAGES.get(name)(rewards, group_ids, eps=eps)
