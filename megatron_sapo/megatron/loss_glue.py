"""forward_step / loss_func for megatron's get_forward_backward_func(), with global normalisation.

The policy loss of a mini-batch is `compute_policy_loss` on the whole mini-batch. Each micro-batch's
loss_func evaluates it on its own sequences with the GLOBAL denominators (sequences with loss tokens and
loss tokens of the whole mini-batch, all DP ranks), so the micro-batch losses sum to the mini-batch loss.
Megatron then applies two averages that we undo explicitly:
  * the schedule divides each micro-batch loss by num_microbatches (2-tuple loss_func contract; it
    also multiplies by the CP size, which DDP's 1/(dp*cp) then cancels),
  * DDP scales gradients by 1/(dp*cp) before summing them over the data-parallel ranks (dense and
    expert parameters alike when calculate_per_token_loss is False).
So loss_func returns loss * num_microbatches * dp. With context parallelism every CP rank evaluates the
whole micro-batch's loss on the gathered log-probs but backpropagates it only through its own tokens
(context_parallel.py), so the CP ranks' gradients add up to one loss's gradient, which the schedule's
x cp and DDP's 1/(dp*cp) leave as it is. The MoE aux loss is NOT rescaled: megatron scales it by
1/num_microbatches (MoEAuxLossAutoScaler) and DDP by 1/dp, i.e. it is the mean over all micro-batches
of each micro-batch's load-balancing loss, as megatron defines it (it depends on how tokens are grouped
into micro-batches; the policy loss does not).

Metrics: loss_func returns sums (token-weighted for the algo's token means), the caller adds them over
micro-batches and DP ranks (reduce_metrics) and divides once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_sapo.megatron import compat, context_parallel

# How each metric of compute_policy_loss combines across micro-batches and ranks; any other name is taken
# to be a mean over this batch's loss tokens and is token-weighted.
_MAX_METRICS = ("ratio_max",)
_MIN_METRICS = ("ratio_min", "gate_min")
_RECOMPUTED = ("ratio_std",)  # from the sums of r and r^2, below


@dataclass
class LossSpec:
    """What the loss needs besides tensors: algo.loss / agg / hypers, KL and entropy terms, temperature."""

    name: str = "sapo"
    agg: str = "seq-mean-token-mean"
    hyper: dict = field(default_factory=dict)
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    # Exact entropy in the training pass costs extra passes over the logits (forward and backward), so
    # with entropy_coef = 0 it is off; compute_log_probs(..., with_entropy=True) gives it forward-only.
    entropy_metric: bool = False

    @classmethod
    def from_config(cls, cfg) -> LossSpec:
        """The spec of cfg.algo (and the rollout temperature the log-probs are taken at)."""
        a = cfg.algo
        hyper = {"sapo": {"tau_pos": a.tau_pos, "tau_neg": a.tau_neg}}.get(
            a.loss, {"eps_low": a.eps_low, "eps_high": a.eps_high}
        )
        return cls(
            name=a.loss,
            agg=a.agg,
            hyper={k: v for k, v in hyper.items() if v is not None},  # unset: the loss's own default
            kl_coef=a.kl_coef,
            kl_type=a.kl_type,
            entropy_coef=a.entropy_coef,
            temperature=cfg.rollout.temperature,
        )


def global_denominators(loss_mask: torch.Tensor) -> tuple[float, float]:
    """(sequences with at least one loss token, loss tokens) of the WHOLE mini-batch."""
    return float((loss_mask.sum(-1) > 0).sum()), float(loss_mask.sum())


def padded_length(loss_mask: torch.Tensor, multiple: int) -> int:
    """Model input length: up to the last loss token of any sequence (later positions cannot influence it:
    causal attention), rounded up to `multiple` (sequence parallel splits the sequence over TP)."""
    positions = torch.nonzero(loss_mask.sum(0) > 0)
    length = int(positions.max()) + 1 if len(positions) else 1
    return -(-length // multiple) * multiple


# Per-token inputs of the loss besides the tokens, [N, S-1] like the labels.
PER_TOKEN_KEYS = ("loss_mask", "old_log_probs", "is_weights", "ref_log_probs")


def fit_width(t: torch.Tensor, length: int) -> torch.Tensor:
    """[N, *] cut or zero-padded to `length` columns."""
    if t.shape[1] >= length:
        return t[:, :length].contiguous()
    return torch.nn.functional.pad(t, (0, length - t.shape[1]))


def make_microbatches(batch: dict, micro_batch_size: int, length: int) -> list[dict]:
    """Split this rank's sequences into micro-batches; inputs tokens[:, :-1], labels tokens[:, 1:], all
    cut or zero-padded to `length` positions (padding has loss_mask 0). packing.py packs them instead."""
    tokens = batch["tokens"]
    n, seq = tokens.shape
    per_token = {"tokens": fit_width(tokens[:, :-1], length), "labels": fit_width(tokens[:, 1:], length)}
    for key in PER_TOKEN_KEYS:
        if batch.get(key) is not None:
            per_token[key] = fit_width(batch[key].float(), length)
    positions = torch.arange(length).unsqueeze(0)
    out = []
    for start in range(0, n, micro_batch_size):
        rows = slice(start, min(n, start + micro_batch_size))
        mb = {k: v[rows] for k, v in per_token.items()}
        mb["position_ids"] = positions.expand(mb["tokens"].shape[0], -1).contiguous()
        if batch.get("advantages") is not None:
            mb["advantages"] = batch["advantages"][rows].float()
        out.append(mb)
    return out


def to_device(mb: dict) -> dict:
    if not torch.cuda.is_available():
        return mb
    return {k: v.cuda(non_blocking=True) for k, v in mb.items()}


def _policy_loss_func(mb, spec: LossSpec, denominators, scale, output_tensor, sink=None):
    """loss_func of one micro-batch (last pipeline stage only). output_tensor: per-token log-probs [b, s]
    (or [b, s, 2] with the entropy) from the LogProbHead. `sink`: a list that receives the detached
    log-probs, in micro-batch order (the router diagnostics reuse the training forward's log-probs)."""
    from megatron_sapo.algo import compute_policy_loss

    log_probs, entropy = _split(output_tensor, mb)
    if sink is not None:
        sink.append({"log_probs": log_probs.detach()})
    mask = mb["loss_mask"]
    num_sequences, num_tokens = denominators
    loss, metrics = compute_policy_loss(
        spec.name,
        log_probs,
        mb["old_log_probs"],
        mb["advantages"],
        mask,
        agg=spec.agg,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        is_weights=mb.get("is_weights"),
        ref_log_probs=mb.get("ref_log_probs"),
        kl_coef=spec.kl_coef,
        kl_type=spec.kl_type,
        entropy=entropy,
        entropy_coef=spec.entropy_coef,
        **spec.hyper,
    )
    return loss * scale, _metric_sums(loss, metrics, log_probs, mb["old_log_probs"], mask)


def _split(output_tensor: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropy or None) per sequence [b, s]: packed rows are unpacked first (packing.py)."""
    if "unpack_index" in mb:
        from megatron_sapo.megatron.packing import unpack  # packing builds on this module

        output_tensor = unpack(output_tensor, mb)
    if output_tensor.dim() == 3:
        return output_tensor[..., 0], output_tensor[..., 1]
    return output_tensor, None


def _metric_sums(loss, metrics, log_probs, old_log_probs, mask) -> dict:
    """Additive (or max/min) statistics of this micro-batch, to be combined by reduce_metrics."""
    n_tokens = mask.sum()
    sums = {"loss": ("sum", loss.detach()), "n_tokens": ("sum", n_tokens)}
    if "ratio_mean" in metrics and "ratio_std" in metrics:
        # sum r = n mean, sum r^2 = n (std^2 + mean^2): the micro-batch moments, combined exactly later
        mean, std = metrics["ratio_mean"].detach(), metrics["ratio_std"].detach()
        sums["ratio_sum"], sums["ratio_sq_sum"] = (
            ("sum", mean * n_tokens),
            ("sum", (std * std + mean * mean) * n_tokens),
        )
    else:
        with torch.no_grad():
            ratio = torch.exp((log_probs.detach() - old_log_probs).clamp(-20, 20)) * mask
            sums["ratio_sum"], sums["ratio_sq_sum"] = ("sum", ratio.sum()), ("sum", (ratio * ratio).sum())
    for name, value in metrics.items():
        if name in _RECOMPUTED or name == "ratio_mean":
            continue
        if name in _MAX_METRICS:
            sums[name] = ("max", value.detach())
        elif name in _MIN_METRICS:
            sums[name] = ("min", value.detach())
        else:
            sums[name] = ("sum", value.detach() * n_tokens)  # a token mean, weighted by its tokens
    return sums


def _log_prob_loss_func(mb, output_tensor):
    """loss_func of the forward-only log-prob pass: no loss, the log-probs (and entropy) as data."""
    log_probs, entropy = _split(output_tensor, mb)
    data = {"log_probs": log_probs} | ({"entropy": entropy} if entropy is not None else {})
    return log_probs.new_zeros(()), data


def _forward_step(loss_func, cp_group, data_iterator, model):
    mb = to_device(next(data_iterator))
    columns = mb.get("cp_positions")
    if columns is not None:
        # Context parallel: this rank's columns go in, the loss sees whole rows (context_parallel.py). The
        # device mode stays on: megatron's rope picks this rank's positions with pin_memory and .cuda().
        tokens, position_ids, labels = (mb[k].index_select(1, columns) for k in ("tokens", "position_ids", "labels"))
        mask = mb.get("attention_mask")  # packed rows: this rank's query rows, every key in position order
        mask = mask.index_select(2, columns) if mask is not None else None
        output = model(tokens, position_ids, mask, labels=labels)
        return output, lambda out: loss_func(mb, context_parallel.gather_columns(out, cp_group))
    # attention_mask None: the layer spec's causal mask (right padding sits after every loss token); packed
    # rows bring their block-diagonal one. labels: the last stage returns log-probs through the LogProbHead.
    with compat.device_args_suspended():  # the forward reaches no "cuda" literal: skip the per-op rewrite
        output = model(mb["tokens"], mb["position_ids"], mb.get("attention_mask"), labels=mb["labels"])
    return output, functools.partial(loss_func, mb)


def policy_forward_step(
    spec: LossSpec, head, denominators, num_microbatches: int, dp_size: int, sink=None, cp_group=None
):
    """forward_step_func for training; see the module docstring for the scale. `sink`: see _policy_loss_func.
    `cp_group`: the context-parallel group (micro-batches then carry cp_positions)."""
    head.temperature, head.with_entropy = spec.temperature, spec.entropy_coef > 0 or spec.entropy_metric
    loss_func = functools.partial(
        _policy_loss_func, spec=spec, denominators=denominators, scale=num_microbatches * dp_size, sink=sink
    )
    return functools.partial(_forward_step, lambda mb, out: loss_func(mb, output_tensor=out), cp_group)


def log_prob_forward_step(spec: LossSpec, head, with_entropy: bool = False, cp_group=None):
    head.temperature, head.with_entropy = spec.temperature, with_entropy
    return functools.partial(_forward_step, _log_prob_loss_func, cp_group)


def reduce_metrics(per_microbatch: list[dict], dp_group, pp_group, last_stage_rank: int, is_last: bool) -> dict:
    """Combine the micro-batch statistics over micro-batches and DP ranks, then hand them from the last
    pipeline stage to every rank. Returns plain floats."""
    result = None
    if is_last:
        combined: dict[str, tuple[str, torch.Tensor]] = {}
        for mb in per_microbatch:
            for name, (op, value) in mb.items():
                if name not in combined:
                    combined[name] = (op, value.detach().float().clone())
                else:
                    prev = combined[name][1]
                    merge = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op]
                    combined[name] = (op, merge(prev, value.float()))
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        for name in sorted(combined):  # same order on every DP rank
            op, value = combined[name]
            if _size(dp_group) > 1:
                dist.all_reduce(value, op=ops[op], group=dp_group)
        result = _finish(
            {name: float(v) for name, (op, v) in combined.items()},
            {name: op for name, (op, v) in combined.items()},
        )
    if _size(pp_group) > 1:
        box = [result]
        dist.broadcast_object_list(box, src=last_stage_rank, group=pp_group)
        result = box[0]
    return result


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _finish(sums: dict, ops: dict) -> dict:
    n = max(sums.get("n_tokens", 0.0), 1.0)
    out = {}
    for name, value in sums.items():
        if name in ("loss", "n_tokens", "ratio_sum", "ratio_sq_sum") or ops[name] != "sum":
            out[name] = value
        else:
            out[name] = value / n
    if "ratio_sum" in sums:
        mean = sums["ratio_sum"] / n
        out["ratio_mean"] = mean
        out["ratio_std"] = max(sums["ratio_sq_sum"] / n - mean * mean, 0.0) ** 0.5
        del out["ratio_sum"], out["ratio_sq_sum"]
    return out
