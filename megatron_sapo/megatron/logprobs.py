"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

logits [b, s, v/tp] (this rank's vocabulary slice, megatron's parallel_output) and labels [b, s] give
    log p(label) = z[label] - logsumexp(z)          z = logits / temperature
    entropy      = logsumexp(z) - sum_v softmax(z)_v z_v
The full softmax is never materialised: the work runs over chunks of tokens, so the extra memory is a
few chunk-sized temporaries (each ~1/8 of the logits by default) plus [tokens]-sized vectors. Across TP
each rank reduces its vocabulary slice (logsumexp, E_p[z], target logit) and the partials are combined as
[tokens] vectors: two collectives per call, whatever the number of chunks.

Backward recomputes the chunk softmax from the saved logits. With `inplace_backward=True` the gradient is
written into the logits' own storage (the caller promises nothing else reads the logits afterwards, as
in the loss glue where they are a private output of the model), so no logits-sized gradient buffer is
allocated either.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

DEFAULT_CHUNKS = 8


def _chunks(n: int, num_chunks: int):
    step = max(1, math.ceil(n / max(1, num_chunks)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _local_targets(labels: torch.Tensor, vocab_start: int, vocab_local: int):
    """Indices into this rank's vocab slice, and which tokens' labels fall into it."""
    local = labels - vocab_start
    inside = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), inside


def _scaled(x: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """z = x / temperature in float32; a read-only view of x when nothing needs to change."""
    z = x.float()
    return z * inv_temp if inv_temp != 1.0 else z


def _combine_over_tp(lse_local, mean_z_local, target, group):
    """Global logsumexp, E_p[z] and target logit from each TP rank's partial ones (two [tokens] all-reduces).
    Rank r's share of the partition function is exp(lse_r - lse)."""
    if group is None or dist.get_world_size(group) == 1:
        return lse_local, mean_z_local, target
    top = _all_reduce(lse_local.clone(), group, dist.ReduceOp.MAX)
    share = torch.exp(lse_local - top)
    sums = _all_reduce(torch.stack([share, share * mean_z_local, target]), group)
    return top + torch.log(sums[0]), sums[1] / sums[0], sums[2]


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, inv_temp, with_entropy, num_chunks, inplace_backward):
        n, vocab_local = logits.shape
        rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
        local_idx, inside = _local_targets(labels, rank * vocab_local, vocab_local)

        # Per chunk: this rank's logsumexp and, for the entropy, E_p[z] under its local softmax.
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        mean_z = torch.zeros(n, dtype=torch.float32, device=logits.device)
        for c in _chunks(n, num_chunks):
            z = _scaled(logits[c], inv_temp)
            lse[c] = torch.logsumexp(z, dim=-1)
            if with_entropy:
                p = (z - lse[c, None]).exp_()
                mean_z[c] = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)  # sum_v p_v z_v, no temp
                del p
            del z
        target = _scaled(logits.gather(-1, local_idx[:, None]).squeeze(-1), inv_temp)
        target = torch.where(inside, target, torch.zeros_like(target))
        lse, mean_z, target = _combine_over_tp(lse, mean_z, target, group)

        log_probs = target - lse
        entropy = lse - mean_z if with_entropy else torch.zeros_like(lse)  # H = lse - E_p[z]
        ctx.save_for_backward(logits, local_idx, inside, lse, mean_z)
        # An output nobody differentiates (the entropy when it is only a metric) gets grad None, not zeros.
        ctx.set_materialize_grads(False)
        ctx.inv_temp, ctx.with_entropy = inv_temp, with_entropy
        ctx.num_chunks, ctx.inplace_backward = num_chunks, inplace_backward
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, local_idx, inside, lse, mean_z = ctx.saved_tensors
        g_lp = grad_log_probs.float() if grad_log_probs is not None else torch.zeros_like(lse)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        # d logp / dz = onehot - p and d H / dz = -p (z - E_p[z]), so the gradient w.r.t. z is
        # p * (a + b z) + onehot * g_lp with a = -g_lp + g_H E_p[z], b = -g_H (per token).
        a = -g_lp + (grad_entropy.float() * mean_z if use_entropy else 0.0)
        b = -grad_entropy.float() if use_entropy else None
        hit = inside.to(torch.float32) * g_lp
        out = logits if ctx.inplace_backward else torch.empty_like(logits)
        # Fast path (fp32 logits, temperature 1, no entropy gradient): the gradient -g p is built in the
        # logits' own storage, 3 passes and no temporaries per chunk.
        in_place = ctx.inplace_backward and logits.dtype == torch.float32 and ctx.inv_temp == 1.0 and b is None
        for c in _chunks(logits.shape[0], ctx.num_chunks):
            if in_place:
                logits[c].sub_(lse[c, None]).exp_().mul_(a[c, None])
                logits[c].scatter_add_(-1, local_idx[c, None], hit[c, None])
                continue
            z = _scaled(logits[c], ctx.inv_temp)
            p = (z - lse[c, None]).exp_()
            grad = p.mul_(a[c, None]) if b is None else torch.addcmul(a[c, None], z, b[c, None]).mul_(p)
            grad.scatter_add_(-1, local_idx[c, None], hit[c, None])
            if ctx.inv_temp != 1.0:
                grad.mul_(ctx.inv_temp)  # chain rule through z = logits / temperature
            out[c].copy_(grad)
            del z, p, grad
        return out, None, None, None, None, None, None


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    num_chunks: int = DEFAULT_CHUNKS,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(labels) [b, s] (float32) and, when asked, the entropy [b, s] of softmax(logits / temperature).

    logits: [b, s, v / tp], this TP rank's contiguous vocabulary slice (rank r holds r*v/tp ... ).
    labels: [b, s] global token ids. tp_group: the tensor-parallel group (None = no TP).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = labels.shape
    flat = logits.reshape(-1, logits.shape[-1])
    log_probs, entropy = _VocabParallelLogProbs.apply(
        flat, labels.reshape(-1), tp_group, 1.0 / temperature, with_entropy, num_chunks, inplace_backward
    )
    return log_probs.view(shape), (entropy.view(shape) if with_entropy else None)


class LogProbHead:
    """Stands in for GPTModel.compute_language_model_loss on the engine's model chunks, so that
    `model(tokens, positions, None, labels=labels)` returns per-token log-probs [b, s] (with_entropy:
    [b, s, 2] = log-prob, entropy) instead of megatron's cross-entropy.

    Why not `model(..., labels=None)` and work on the returned logits: GPTModel then returns
    `logits.transpose(0, 1).contiguous()`, a logits-sized copy forward and a strided gradient backward
    (tools/bench_train_step.py on CPU: SAPO/bare-CE step ratio 1.07-1.20 that way, ~1.00 with this head).
    Here the [s, b, v/tp] logits are read where they are, and they are this head's private tensor, so the
    backward writes the gradient into their storage.
    `temperature` and `with_entropy` are set by the caller before each pass."""

    def __init__(self, tp_group):
        self.tp_group = tp_group
        self.temperature = 1.0
        self.with_entropy = False

    def __call__(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        log_probs, entropy = vocab_parallel_log_probs(
            logits,
            labels.transpose(0, 1),  # logits are [s, b, v/tp]
            self.tp_group,
            temperature=self.temperature,
            with_entropy=self.with_entropy,
            inplace_backward=True,
        )
        if self.with_entropy:
            return torch.stack([log_probs, entropy], dim=-1).transpose(0, 1)
        return log_probs.transpose(0, 1)


def attach_log_prob_head(chunks: list, tp_group) -> LogProbHead:
    """Install one LogProbHead on every chunk that holds the output layer (the last pipeline stage)."""
    head = LogProbHead(tp_group)
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        if getattr(module, "post_process", False):
            module.compute_language_model_loss = head
    return head
