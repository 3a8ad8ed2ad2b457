"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

logits [b, s, v/tp] (this rank's vocabulary slice, megatron's parallel_output) and labels [b, s] give
    log p(label) = z[label] - logsumexp(z)          z = logits / temperature
    entropy      = logsumexp(z) - sum_v softmax(z)_v z_v
The full softmax is never materialised: the work runs over chunks of tokens, so the extra memory is a
few chunk-sized temporaries (each ~1/8 of the logits by default) plus [tokens]-sized vectors. Across TP
the partial reductions (max, sum-exp, target logit, sum p*z) are all-reduced as [tokens] vectors: two
collectives per call, whatever the number of chunks.

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


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, inv_temp, with_entropy, num_chunks, inplace_backward):
        n, vocab_local = logits.shape
        rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
        local_idx, inside = _local_targets(labels, rank * vocab_local, vocab_local)

        # Pass 1: the global max per token (numerical stability of exp).
        zmax = torch.empty(n, dtype=torch.float32, device=logits.device)
        for c in _chunks(n, num_chunks):
            zmax[c] = logits[c].float().amax(dim=-1) * inv_temp  # inv_temp > 0 keeps the argmax
        _all_reduce(zmax, group, dist.ReduceOp.MAX)

        # Pass 2: sum exp(z - max), sum exp(z - max) * z and the target logit, then one all-reduce.
        sums = torch.zeros(3, n, dtype=torch.float32, device=logits.device)
        for c in _chunks(n, num_chunks):
            z = logits[c].float() * inv_temp
            e = torch.exp(z - zmax[c, None])
            sums[0, c] = e.sum(dim=-1)
            if with_entropy:
                sums[1, c] = (e * z).sum(dim=-1)
            del z, e
        target = logits.gather(-1, local_idx[:, None]).squeeze(-1).float() * inv_temp
        sums[2] = torch.where(inside, target, torch.zeros_like(target))
        _all_reduce(sums, group)

        lse = zmax + torch.log(sums[0])
        log_probs = sums[2] - lse
        # E_p[z] = sum p z; entropy = lse - E_p[z]
        mean_z = sums[1] / sums[0] if with_entropy else torch.zeros_like(lse)
        entropy = lse - mean_z if with_entropy else torch.zeros_like(lse)

        ctx.save_for_backward(logits, local_idx, inside, lse, mean_z)
        ctx.inv_temp, ctx.with_entropy = inv_temp, with_entropy
        ctx.num_chunks, ctx.inplace_backward = num_chunks, inplace_backward
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, local_idx, inside, lse, mean_z = ctx.saved_tensors
        n = logits.shape[0]
        use_entropy = ctx.with_entropy and grad_entropy is not None
        g_lp = grad_log_probs.float() if grad_log_probs is not None else torch.zeros_like(lse)
        out = logits if ctx.inplace_backward else torch.empty_like(logits)
        for c in _chunks(n, ctx.num_chunks):
            z = logits[c].float() * ctx.inv_temp
            p = torch.exp(z - lse[c, None])
            # d logp / dz = onehot - p ;  d entropy / dz = -p (z - E_p[z])
            if use_entropy:
                z.sub_(mean_z[c, None]).mul_(p).mul_(grad_entropy[c, None].float())
            grad = p.mul_(-g_lp[c, None])
            if use_entropy:
                grad.sub_(z)
            hit = inside[c].to(grad.dtype) * g_lp[c]
            grad.scatter_add_(-1, local_idx[c, None], hit[:, None])
            out[c] = grad.mul_(ctx.inv_temp)  # chain rule through z = logits / temperature
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
