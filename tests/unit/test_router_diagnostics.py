"""Pure-torch router diagnostics (megatron_sapo/diagnostics/router.py): the decomposition is exact, the
per-layer statistics and the SAPO gate split are what their definitions say."""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.diagnostics import router as rd


def _random(n=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp_old = -torch.rand(n, t, generator=g) * 3
    lp_replay = lp_old + 0.2 * torch.randn(n, t, generator=g)
    lp_theta = lp_replay + 0.1 * torch.randn(n, t, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.3).float()
    return lp_theta, lp_replay, lp_old, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decomposition_sums_exactly(seed):
    lp_theta, lp_replay, lp_old, mask = _random(seed=seed)
    d = rd.decompose(lp_theta, lp_replay, lp_old, mask)
    assert float(d["var_logratio"]) > 0
    total = d["var_route"] + d["var_weight"] + 2 * d["cov_route_weight"]
    assert float(total) == pytest.approx(float(d["var_logratio"]), rel=1e-9)
    # against a direct computation on the selected tokens
    sel = mask > 0
    l_route, l_weight = (lp_theta - lp_replay)[sel].double(), (lp_replay - lp_old)[sel].double()
    assert float(d["var_route"]) == pytest.approx(float(l_route.var(unbiased=False)), rel=1e-9)
    assert float(d["var_weight"]) == pytest.approx(float(l_weight.var(unbiased=False)), rel=1e-9)
    assert float(d["share"]) == pytest.approx(float(d["var_route"] / d["var_logratio"]), rel=1e-9)
    # masked-out tokens do not count: changing them leaves every statistic unchanged
    noisy = torch.where(sel, lp_theta, lp_theta + 100.0)
    d2 = rd.decompose(noisy, lp_replay, lp_old, mask)
    assert all(float(d2[k]) == pytest.approx(float(d[k]), rel=1e-9) for k in d)


def test_identical_policies_give_zero_variance_and_no_router_share():
    lp_theta, _, _, mask = _random()
    d = rd.decompose(lp_theta, lp_theta, lp_theta, mask)
    assert all(float(v) == 0.0 for v in d.values())


def test_layer_metrics_change_rate_variances_load_entropy():
    n, t, layers, k, experts = 2, 4, 2, 2, 4
    old = torch.tensor([0, 1]).expand(n, t, layers, k).clone()
    new = old.clone()
    new[0, 0, 1] = torch.tensor([1, 0])  # same set, other order: NOT a change
    new[1, 2, 1] = torch.tensor([2, 3])  # a change in layer 1
    new[1, 3, 1] = torch.tensor([3, 0])  # a change in layer 1, but a masked-out token
    mask = torch.ones(n, t)
    mask[1, 3] = 0
    log_ratio = torch.arange(n * t, dtype=torch.float64).view(n, t)
    entropy = torch.full((n, t, layers), 0.5)
    m = rd.layer_metrics(old, new, entropy, log_ratio, mask, [0, 1], experts)
    assert float(m["layer0/change_rate"]) == 0.0 and float(m["layer0/var_changed"]) == 0.0
    assert float(m["layer1/change_rate"]) == pytest.approx(1 / 7)
    sel = torch.tensor([0, 1, 2, 3, 4, 5, 6.0], dtype=torch.float64)
    assert float(m["layer0/var_unchanged"]) == pytest.approx(float(sel.var(unbiased=False)))
    unchanged = torch.tensor([0, 1, 2, 3, 4, 5.0], dtype=torch.float64)
    assert float(m["layer1/var_unchanged"]) == pytest.approx(float(unchanged.var(unbiased=False)))
    # layer 0: experts 0 and 1 get 7 tokens each, 2 and 3 none: cv = 1, max/mean = 2
    assert float(m["layer0/load_cv"]) == pytest.approx(1.0)
    assert float(m["layer0/load_max_mean"]) == pytest.approx(2.0)
    assert float(m["layer1/entropy"]) == pytest.approx(0.5)


def test_router_metrics_names_and_gate_split():
    lp_theta, lp_replay, lp_old, mask = _random(n=4, t=5)
    ids = torch.tensor([0, 1]).expand(4, 5, 3, 2).clone()
    ids[..., 1, :] = -1  # layer 1 is dense
    new_ids = ids.clone()
    new_ids[0, :, 2] = torch.tensor([2, 3])  # sequence 0 changes routing in layer 2
    old = {"ids": ids, "entropy": torch.zeros(4, 5, 3), "moe_layers": [0, 2]}
    new = {"ids": new_ids, "entropy": torch.zeros(4, 5, 3), "moe_layers": [0, 2]}
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    m = rd.router_metrics(lp_theta, lp_replay, lp_old, mask, old, new, 4, advantages=adv, sapo_tau=(1.0, 1.05))
    for name in ("var_logratio", "var_route", "var_weight", "cov_route_weight", "share"):
        assert isinstance(m[f"router/{name}"], float)
    for layer in (0, 2):
        for name in ("change_rate", "var_changed", "var_unchanged", "load_cv", "entropy"):
            assert f"router/layer{layer}/{name}" in m
    assert "router/layer1/change_rate" not in m
    assert m["router/layer0/change_rate"] == 0.0
    assert m["router/layer2/change_rate"] == pytest.approx(float(mask[0].sum() / mask.sum()))
    # the gate split against a direct computation
    from megatron_sapo.algo.losses import sapo_gate

    ratio = torch.exp((lp_theta - lp_old).double())
    tau = torch.where(adv[:, None] > 0, 1.0, 1.05).expand_as(ratio).double()
    _, w = sapo_gate(ratio, tau)
    changed = torch.zeros(4, 5, dtype=torch.bool)
    changed[0] = True
    sel = changed & (mask > 0)
    assert m["router/gate_changed"] == pytest.approx(float(w[sel].mean()), rel=1e-6)
    assert m["router/gate_unchanged"] == pytest.approx(float(w[~changed & (mask > 0)].mean()), rel=1e-6)


def test_sample_rows():
    assert rd.sample_rows(16, 64, 4) == 16
    assert rd.sample_rows(16, 6, 4) == 4
    assert rd.sample_rows(16, 2, 4) == 4


def test_collate_rollout_routing_layout():
    from types import SimpleNamespace

    from megatron_sapo.megatron.routing import attach_replay, collate_rollout_routing

    a = SimpleNamespace(routed_experts=torch.tensor([[[0, 1]], [[2, 3]], [[1, 2]]]))  # 3 input tokens, 1 layer
    b = SimpleNamespace(routed_experts=torch.tensor([[[3, 0]]] * 6))  # longer than the batch width allows
    ids = collate_rollout_routing([a, b], width=5, num_layers=1, topk=2)
    assert ids.shape == (2, 4, 1, 2)
    assert ids[0, :3, 0].tolist() == [[0, 1], [2, 3], [1, 2]] and ids[0, 3].tolist() == [[-1, -1]]
    assert ids[1, :, 0].tolist() == [[3, 0]] * 4
    assert collate_rollout_routing([a, SimpleNamespace(routed_experts=None)], 5, 1, 2) is None
    with pytest.raises(ValueError, match="routed_experts of shape"):
        collate_rollout_routing([SimpleNamespace(routed_experts=torch.zeros(3, 2, 2))], 5, 1, 2)
    # micro-batches: cut / padded to the model length; unrouted positions get experts 0..K-1
    mbs = attach_replay([{"tokens": torch.zeros(1, 6)}, {"tokens": torch.zeros(1, 6)}], ids, 1, 6, 2)
    assert mbs[0]["replay_routing"].shape == (1, 6, 1, 2)
    assert mbs[0]["replay_routing"][0, 3:, 0].tolist() == [[0, 1]] * 3
    assert torch.equal(mbs[1]["replay_routing"][0, :4], ids[1])


def test_rollout_change_rates_skip_unreported_tokens():
    trainer = torch.tensor([0, 1]).expand(1, 4, 1, 2).clone()
    rollout = trainer.clone()
    rollout[0, 1, 0] = torch.tensor([1, 0])  # same set
    rollout[0, 2, 0] = torch.tensor([2, 1])  # changed
    rollout[0, 3, 0] = -1  # not reported
    m = rd.rollout_change_rates(rollout, trainer, torch.ones(1, 4), [0])
    assert float(m["layer0/rollout_change_rate"]) == pytest.approx(1 / 3)
