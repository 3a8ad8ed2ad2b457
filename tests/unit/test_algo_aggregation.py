"""Aggregation with global denominators: any split of a batch sums to the full-batch loss and gradient."""

import pytest
import torch

from megatron_sapo.algo import AGGREGATIONS, POLICY_LOSSES, compute_policy_loss, count_sequences

pytestmark = pytest.mark.usefixtures("float64")


def _batch(seed=0, B=8, T=10):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(B, T, generator=g) * 0.5
    old = log_probs + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = 0  # an empty response
    prompt = torch.randint(0, 3, (B,), generator=g)
    pos = torch.arange(T)
    mask = ((pos >= prompt[:, None]) & (pos < (prompt + lengths)[:, None])).double()
    return log_probs, old, adv, mask


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["sapo", "grpo", "gspo", "gspo_token"])
@pytest.mark.parametrize("chunks", [2, 3, 8])
def test_chunked_losses_sum_to_full_batch(name, agg, chunks):
    log_probs, old, adv, mask = _batch()
    hyper = {"eps_low": 0.05, "eps_high": 0.05} if name != "sapo" else {}
    full_lp = log_probs.clone().requires_grad_()
    full, _ = compute_policy_loss(name, full_lp, old, adv, mask, agg=agg, **hyper)
    full.backward()

    num_sequences, num_tokens = count_sequences(mask), mask.sum()
    split_lp = log_probs.clone().requires_grad_()
    total = 0.0
    for idx in torch.arange(len(adv)).tensor_split(chunks):
        part, _ = compute_policy_loss(
            name,
            split_lp[idx],
            old[idx],
            adv[idx],
            mask[idx],
            agg=agg,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            **hyper,
        )
        total = total + part
    total.backward()
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-14)


def test_local_denominators_would_break_invariance():
    """Negative control: chunk losses with *local* denominators do not reproduce the full batch."""
    log_probs, old, adv, mask = _batch(seed=1)
    full, _ = compute_policy_loss("sapo", log_probs, old, adv, mask, agg="token-mean")
    total = sum(
        compute_policy_loss("sapo", log_probs[i], old[i], adv[i], mask[i], agg="token-mean")[0]
        for i in torch.arange(8).tensor_split(2)
    )
    assert abs(total.item() - full.item()) > 1e-6


def test_aggregation_modes_match_their_definitions():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert AGGREGATIONS.get("seq-mean-token-mean")(per_token, mask).item() == pytest.approx((2.0 + 4.0) / 2)
    assert AGGREGATIONS.get("token-mean")(per_token, mask).item() == pytest.approx(10.0 / 4)
    assert AGGREGATIONS.get("seq-mean-token-sum")(per_token, mask).item() == pytest.approx(10.0 / 2)


def test_padded_and_prompt_tokens_never_contribute():
    log_probs, old, adv, mask = _batch(seed=4)
    for name in POLICY_LOSSES.names():
        base, _ = compute_policy_loss(name, log_probs, old, adv, mask)
        garbage = torch.where(mask > 0, log_probs, torch.full_like(log_probs, 7.0))
        garbage_old = torch.where(mask > 0, old, torch.full_like(old, -9.0))
        other, _ = compute_policy_loss(name, garbage, garbage_old, adv, mask)
        assert other.item() == pytest.approx(base.item(), rel=1e-12), name
