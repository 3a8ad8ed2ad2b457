"""vocab_parallel_log_probs against a plain log_softmax reference, TP1 and TP2 (two gloo processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_sapo.megatron.logprobs import vocab_parallel_log_probs


def _reference(logits, labels, temperature, weights_lp, weights_ent):
    z = logits / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    objective = (logp * weights_lp).sum() + (entropy * weights_ent).sum()
    (grad,) = torch.autograd.grad(objective, logits)
    return logp.detach(), entropy.detach(), grad


def _inputs(seed=0, b=3, s=7, v=40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    return (
        logits,
        labels,
        torch.randn(b, s, generator=g, dtype=torch.float64),
        torch.randn(b, s, generator=g, dtype=torch.float64),
    )


def _ours(logits_shard, labels, temperature, w_lp, w_ent, group, inplace, num_chunks=3):
    leaf = logits_shard.clone().requires_grad_(True)
    x = leaf * 1.0 if inplace else leaf  # in-place backward writes into a non-leaf it owns
    logp, ent = vocab_parallel_log_probs(
        x,
        labels,
        group,
        temperature=temperature,
        with_entropy=True,
        num_chunks=num_chunks,
        inplace_backward=inplace,
    )
    ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return logp.detach(), ent.detach(), leaf.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_log_softmax_tp1(temperature, inplace):
    logits, labels, w_lp, w_ent = _inputs()
    ref_lp, ref_ent, ref_grad = _reference(logits.clone().requires_grad_(True), labels, temperature, w_lp, w_ent)
    lp, ent, grad = _ours(logits, labels, temperature, w_lp, w_ent, None, inplace)
    # float32 math inside: compare at float32 tolerance
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_as_metric_only(temperature):
    """Entropy computed but not differentiated (the fast in-place backward path at temperature 1)."""
    logits, labels, w_lp, _ = _inputs(3)
    _, ref_ent, ref_grad = _reference(logits.clone().requires_grad_(True), labels, temperature, w_lp, 0.0 * w_lp)
    leaf = logits.float().requires_grad_(True)  # float32: the dtype of the fast path
    logp, ent = vocab_parallel_log_probs(
        leaf * 1.0, labels, None, temperature=temperature, with_entropy=True, num_chunks=2, inplace_backward=True
    )
    (logp * w_lp.float()).sum().backward()
    torch.testing.assert_close(ent.detach().double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


def test_forward_only_and_no_entropy():
    logits, labels, *_ = _inputs(1)
    with torch.no_grad():
        lp, ent = vocab_parallel_log_probs(logits.float(), labels)
    assert ent is None
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)


def test_reference_comparison_can_fail():
    """Negative control: a wrong temperature must not pass the same tolerance."""
    logits, labels, w_lp, w_ent = _inputs()
    ref_lp, _, _ = _reference(logits.clone().requires_grad_(True), labels, 1.0, w_lp, w_ent)
    lp, _, _ = _ours(logits, labels, 0.7, w_lp, w_ent, None, False)
    assert not torch.allclose(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    logits, labels, w_lp, w_ent = _inputs(2, v=40)
    shard = logits.chunk(2, dim=-1)[rank].contiguous()
    results = {}
    for temperature, inplace in [(1.0, False), (0.7, True)]:
        results[(temperature, inplace)] = _ours(shard, labels, temperature, w_lp, w_ent, dist.group.WORLD, inplace)
    out[rank] = results
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_matches_log_softmax_tp2():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        out = dict(out)
    logits, labels, w_lp, w_ent = _inputs(2, v=40)
    for (temperature, inplace), _ in out[0].items():
        ref_lp, ref_ent, ref_grad = _reference(logits.clone().requires_grad_(True), labels, temperature, w_lp, w_ent)
        grads = []
        for rank in (0, 1):
            lp, ent, grad = out[rank][(temperature, inplace)]
            torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
            grads.append(grad)
        torch.testing.assert_close(torch.cat(grads, dim=-1), ref_grad, rtol=1e-5, atol=1e-5)
