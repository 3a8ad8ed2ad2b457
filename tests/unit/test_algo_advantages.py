"""Advantages, KL estimators and train/inference mismatch weights and metrics."""

import math
import statistics

import pytest
import torch

from megatron_sapo.algo import compute_advantages, kl_penalty, mismatch_metrics, truncated_is_weights


def test_grpo_advantages_are_group_normalised():
    rewards = [1.0, 0.0, 1.0, 0.5, 3.0, 2.0, 7.0]
    groups = [5, 5, 5, 9, 9, 9, 2]  # unsorted ids, a group of one
    adv = compute_advantages("grpo", rewards, groups)
    for members in ([0, 1, 2], [3, 4, 5]):
        rs = [rewards[i] for i in members]
        mu, sd = statistics.mean(rs), statistics.stdev(rs)
        for i in members:
            assert adv[i].item() == pytest.approx((rewards[i] - mu) / (sd + 1e-6), rel=1e-5)
    assert adv[6].item() == 0.0


def test_equal_rewards_give_zero_advantage_not_nan():
    adv = compute_advantages("grpo", [1.0, 1.0, 1.0], [0, 0, 0])
    assert torch.equal(adv, torch.zeros(3))


def test_drgrpo_and_rloo():
    rewards, groups = [1.0, 0.0, 2.0, 4.0], [0, 0, 0, 1]
    dr = compute_advantages("drgrpo", rewards, groups)
    torch.testing.assert_close(dr, torch.tensor([0.0, -1.0, 1.0, 0.0]))
    rloo = compute_advantages("rloo", rewards, groups)
    torch.testing.assert_close(rloo, torch.tensor([1.0 - 1.0, 0.0 - 1.5, 2.0 - 0.5, 0.0]))


def test_unknown_advantage_and_shape_errors():
    with pytest.raises(ValueError, match="valid names: drgrpo, grpo, rloo"):
        compute_advantages("ppo", [1.0], [0])
    with pytest.raises(ValueError, match="must be equal 1-d"):
        compute_advantages("grpo", [1.0, 2.0], [0])


def test_kl_estimators_against_definitions():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), lp - ref)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * (lp - ref) ** 2)
    expected_k3 = [math.exp(r - p) - (r - p) - 1 for p, r in zip(lp.tolist(), ref.tolist())]
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor(expected_k3))
    assert kl_penalty(lp, ref, "k3")[2].item() == 0.0


def test_truncated_importance_weights_token_and_sequence():
    old = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    rollout = torch.tensor([[-1.0, -0.9, 0.0], [0.1, 0.1, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, rollout, mask, cap=2.0, level="token")
    torch.testing.assert_close(w[0], torch.tensor([2.0, math.exp(-0.1), 1.0]))  # e^1 capped at 2
    ws = truncated_is_weights(old, rollout, mask, cap=2.0, level="sequence")
    torch.testing.assert_close(ws[1], torch.full((3,), math.exp(-0.2)))  # product over masked tokens
    torch.testing.assert_close(ws[0], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="valid: sequence, token"):
        truncated_is_weights(old, rollout, mask, cap=2.0, level="geo")


def test_mismatch_metrics():
    old = torch.tensor([[0.0, -1.0, 0.0, 3.0]])
    rollout = torch.tensor([[0.0, 0.0, -0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    m = mismatch_metrics(old, rollout, mask)
    d = [0.0, -1.0, 0.1]
    assert m["kl_rollout_k3"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3, rel=1e-6)
    assert m["mismatch_frac_ln2"].item() == pytest.approx(1 / 3)
    assert m["mismatch_abs_mean"].item() == pytest.approx(1.1 / 3, rel=1e-6)


def test_kl_penalty_and_entropy_bonus_enter_the_loss():
    from megatron_sapo.algo import compute_policy_loss

    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    ent = torch.tensor([[0.5, 0.7]])
    mask = torch.ones(1, 2)
    base, _ = compute_policy_loss("grpo", lp, lp.detach(), torch.ones(1), mask)
    with_kl, m = compute_policy_loss(
        "grpo", lp, lp.detach(), torch.ones(1), mask, ref_log_probs=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01
    )
    k3 = (math.exp(1.0) - 1.0 - 1.0) / 2  # second token: ref - lp = 1
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * k3 - 0.01 * 0.6, rel=1e-6)
    assert m["kl_ref"].item() == pytest.approx(k3, rel=1e-6)
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        compute_policy_loss("grpo", lp, lp.detach(), torch.ones(1), mask, kl_coef=0.1)
