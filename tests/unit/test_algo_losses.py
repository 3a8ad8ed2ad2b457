"""SAPO / GRPO / GSPO losses against hand-computed values and closed-form gradients."""

import math

import pytest
import torch

from megatron_sapo.algo import POLICY_LOSSES, compute_policy_loss, sapo_gate

pytestmark = pytest.mark.usefixtures("float64")


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("adv,tau", [(1.5, 1.0), (-0.7, 1.05)])
def test_sapo_loss_matches_hand_computation_for_both_signs(adv, tau):
    log_ratio = 0.3
    log_probs = torch.tensor([[log_ratio, 0.0]], requires_grad=True)
    old = torch.zeros(1, 2)
    mask = torch.tensor([[1.0, 0.0]])  # second token is padding
    loss, metrics = compute_policy_loss("sapo", log_probs, old, torch.tensor([adv]), mask, tau_pos=1.0, tau_neg=1.05)
    r = math.exp(log_ratio)
    p = _sigmoid(tau * (r - 1.0))
    expected_gate = p * 4.0 / tau
    assert loss.item() == pytest.approx(-expected_gate * adv, rel=1e-12)
    assert metrics["gate_mean"].item() == pytest.approx(4 * p * (1 - p), rel=1e-12)
    loss.backward()
    # d loss / d log pi = -w r A (one sequence, one token: the normaliser is 1); padding gets nothing
    assert log_probs.grad[0, 0].item() == pytest.approx(-4 * p * (1 - p) * r * adv, rel=1e-10)
    assert log_probs.grad[0, 1].item() == 0.0


def test_sapo_gate_weight_is_sech_squared_and_one_at_ratio_one():
    ratio = torch.tensor([0.5, 1.0, 1.7, 3.0])
    for tau in (0.5, 1.0, 1.05, 4.0):
        _, w = sapo_gate(ratio, tau)
        sech2 = 1.0 / torch.cosh(tau * (ratio - 1.0) / 2.0) ** 2
        torch.testing.assert_close(w, sech2)
        assert w[1].item() == pytest.approx(1.0)


def test_sapo_gradient_equals_closed_form_on_random_batch():
    torch.manual_seed(0)
    B, T = 4, 7
    log_probs = (torch.randn(B, T) * 0.5).requires_grad_()
    old = log_probs.detach() + torch.randn(B, T) * 0.4
    adv = torch.tensor([1.2, -0.5, 0.0, -2.0])
    mask = (torch.rand(B, T) > 0.3).double()
    loss, _ = compute_policy_loss("sapo", log_probs, old, adv, mask, tau_pos=1.0, tau_neg=1.05)
    loss.backward()
    r = torch.exp(log_probs.detach() - old)
    tau = torch.where(adv > 0, 1.0, 1.05)[:, None].expand(B, T)
    p = torch.sigmoid(tau * (r - 1))
    w = 4 * p * (1 - p)
    lengths = mask.sum(-1, keepdim=True)
    num_seq = (mask.sum(-1) > 0).sum()
    expected = -w * r * adv[:, None] * mask / lengths.clamp(min=1) / num_seq
    torch.testing.assert_close(log_probs.grad, expected)


def test_sapo_gradient_equals_grpo_gradient_on_policy():
    torch.manual_seed(1)
    log_probs = torch.randn(3, 6).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 0.3])
    mask = torch.ones(3, 6)
    grads = {}
    for name in ("sapo", "grpo"):
        lp = log_probs.detach().clone().requires_grad_()
        loss, _ = compute_policy_loss(name, lp, lp.detach(), adv, mask)
        loss.backward()
        grads[name] = lp.grad
    assert torch.equal(grads["sapo"], grads["grpo"])


def test_sapo_negative_side_decays_faster_with_larger_tau_neg():
    lp = torch.tensor([[0.5]], requires_grad=True)
    weights = []
    for tau_neg in (0.95, 1.05):
        _, metrics = compute_policy_loss(
            "sapo", lp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), tau_neg=tau_neg
        )
        weights.append(metrics["gate_mean"].item())
    assert weights[1] < weights[0]


def test_grpo_clips_tokens_outside_the_trust_region():
    log_probs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]])).requires_grad_()
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    loss, metrics = compute_policy_loss("grpo", log_probs, old, adv, torch.ones(1, 4), eps_low=0.2, eps_high=0.27)
    loss.backward()
    # r=1.5,A>0: clipped at 1.27 (no grad); r=0.5,A<0: clipped at 0.8 (no grad); r=1.1: grad -r A / 4;
    # r=0.7,A>0: min(0.7, 0.8)=0.7 unclipped (grad)
    expected_value = -(1.27 * 1 + 0.8 * -1 + 1.1 + 0.7) / 4
    assert loss.item() == pytest.approx(expected_value)
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.0, 0.0, -1.1 / 4, -0.7 / 4]]))
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.25)


def test_gspo_sequence_ratio_is_exp_of_masked_mean_and_clips_whole_sequences():
    log_ratio = torch.tensor([[0.01, -0.002, 0.5], [0.0001, 0.0002, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the big values sit on padding
    log_probs = log_ratio.clone().requires_grad_()
    adv = torch.tensor([1.0, 1.0])
    loss, metrics = compute_policy_loss("gspo", log_probs, torch.zeros(2, 3), adv, mask, eps_low=3e-4, eps_high=4e-4)
    loss.backward()
    s0 = math.exp((0.01 - 0.002) / 2)  # 1.004 > 1 + 4e-4: sequence 0 is clipped entirely
    s1 = math.exp((0.0001 + 0.0002) / 2)  # inside the trust region
    assert loss.item() == pytest.approx(-(min(s0, 1 + 4e-4) + s1) / 2)
    assert torch.all(log_probs.grad[0] == 0)
    # unclipped sequence: d(-s A)/d l_t = -s A / |y| per token, / 2 sequences
    torch.testing.assert_close(log_probs.grad[1, :2], torch.full((2,), -s1 / 2 / 2))
    assert log_probs.grad[1, 2].item() == 0.0
    assert metrics["clip_frac"].item() == pytest.approx(0.5)


def test_gspo_token_value_equals_gspo_and_gradient_is_per_token():
    torch.manual_seed(2)
    lp = (torch.randn(2, 5) * 1e-4).requires_grad_()
    old = torch.zeros(2, 5)
    adv = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.ones(2, 5)
    loss_tok, _ = compute_policy_loss("gspo_token", lp, old, adv, mask, eps_low=0.1, eps_high=0.1)
    loss_seq, _ = compute_policy_loss("gspo", lp, old, adv, mask, eps_low=0.1, eps_high=0.1)
    assert loss_tok.item() == pytest.approx(loss_seq.item(), rel=1e-12)
    loss_tok.backward()
    s = torch.exp(lp.detach().mean(-1, keepdim=True))
    torch.testing.assert_close(lp.grad, -s * adv / 5 / 2)


def test_all_masked_sequence_contributes_nothing_and_no_nan():
    torch.manual_seed(3)
    for name in POLICY_LOSSES.names():
        for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"):
            lp = torch.randn(3, 4).requires_grad_()
            old = lp.detach() + 0.1
            mask = torch.ones(3, 4)
            mask[1] = 0.0
            adv = torch.tensor([1.0, 5.0, -1.0])
            loss, metrics = compute_policy_loss(name, lp, old, adv, mask, agg=agg)
            loss.backward()
            assert torch.isfinite(loss)
            assert all(torch.isfinite(v) for v in metrics.values()), (name, agg, metrics)
            assert torch.all(lp.grad[1] == 0)
            # same loss as dropping the masked sequence altogether
            keep = [0, 2]
            loss2, _ = compute_policy_loss(name, lp.detach()[keep], old[keep], adv[keep], mask[keep], agg=agg)
            assert loss.item() == pytest.approx(loss2.item(), rel=1e-12)


def test_all_masked_batch_gives_zero_loss():
    lp = torch.randn(2, 3, requires_grad=True)
    loss, metrics = compute_policy_loss("sapo", lp, lp.detach(), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_unknown_names_list_the_valid_ones():
    lp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="valid names: grpo, gspo, gspo_token, sapo"):
        compute_policy_loss("ppo", lp, lp, torch.ones(1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="valid names: seq-mean-token-mean, seq-mean-token-sum, token-mean"):
        compute_policy_loss("sapo", lp, lp, torch.ones(1), torch.ones(1, 1), agg="mean")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        compute_policy_loss("sapo", lp, lp, torch.ones(1), torch.ones(1, 1), tau=1.0)


def test_extreme_log_ratios_stay_finite():
    lp = torch.tensor([[80.0, -80.0]], requires_grad=True)
    for name in POLICY_LOSSES.names():
        lp.grad = None
        loss, _ = compute_policy_loss(name, lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
        loss.backward()
        assert torch.isfinite(loss) and torch.all(torch.isfinite(lp.grad)), name


def test_ratio_extremes_ignore_padding():
    lp = torch.log(torch.tensor([[0.9, 0.8, 5.0], [0.7, 0.95, 0.01]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    _, metrics = compute_policy_loss("sapo", lp, torch.zeros(2, 3), torch.ones(2), mask)
    assert metrics["ratio_max"].item() == pytest.approx(0.95)
    assert metrics["ratio_min"].item() == pytest.approx(0.7)
    assert metrics["ratio_mean"].item() == pytest.approx((0.9 + 0.8 + 0.7 + 0.95) / 4)
