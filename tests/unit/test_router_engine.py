"""Routing capture / r2 replay / router diagnostics through MegatronEngine at world size 1 (real
megatron-core). Multi-layout equality (EP2, TP2+SP, PP2) is in tests/dist."""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.config import Config
from megatron_sapo.data.collate import minibatches
from megatron_sapo.diagnostics.router import (
    RouterStep,
    decompose,
    rollout_change_rates,
    routing_changed,
    run_router_diagnostics,
)
from megatron_sapo.megatron.routing import REPLAY_KEY
from tests.batches import right_padded_batch


def _config(num_experts: int = 4) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.num_experts, m.moe_shared_expert_ffn_hidden_size = 2, num_experts, 32 if num_experts else 0
    m.moe_router_load_balancing = "none"  # router gradients can only come through the routed probabilities
    cfg.train.micro_batch_size = 2
    cfg.optim.lr = 3e-2  # big steps: routing must move after one update
    cfg.diagnostics.max_sequences = 4
    return cfg


def _batch(n=4, s=20, vocab=512, seed=0) -> dict:
    return right_padded_batch(n, s, vocab, seed, response=6, advantages=[1.0, -1.0, 0.5, -0.5])


@pytest.fixture(scope="module")
def moe():
    from megatron_sapo.megatron.engine import MegatronEngine

    eng = MegatronEngine(_config())
    batch = _batch()
    lp, rec = eng.compute_log_probs(batch, record_routing=True)
    batch["old_log_probs"] = lp
    w0 = eng.global_state_dict()
    yield eng, batch, rec, w0
    eng.shutdown()


def test_capture_layout_and_free_routing_is_topk(moe):
    eng, batch, rec, _ = moe
    ids, probs, mask = rec["ids"], rec["probs"], batch["loss_mask"] > 0
    assert rec["moe_layers"] == [0, 1] and ids.shape == (4, 19, 2, 2)
    assert bool((ids[mask] >= 0).all()) and bool((ids[mask] < 4).all())
    assert bool((ids[mask][..., 0] != ids[mask][..., 1]).all())  # two distinct experts per token
    torch.testing.assert_close(probs[mask].sum(-1), torch.ones(int(mask.sum()), 2))
    assert float(rec["entropy"][mask].min()) > 0
    # positions past the batch's last loss token were never routed
    last = int(torch.nonzero(mask.any(0)).max()) + 1
    assert bool((ids[:, last:] == -1).all())
    # not one fixed expert pair: the capture sees real, token-dependent routing
    assert len({tuple(x) for x in ids[mask][:, 0].tolist()}) > 2


def test_r2_replay_exact_after_update_and_router_gradients_flow(moe):
    eng, batch, rec, w0 = moe
    replay = dict(batch, **{REPLAY_KEY: rec["ids"]})
    try:
        eng.train_minibatch(replay)
        # free routing moved (the update is big) but replay forces the recorded sets exactly
        _, free = eng.compute_log_probs(batch, record_routing=True)
        _, forced = eng.compute_log_probs(replay, record_routing=True)
        mask = batch["loss_mask"] > 0
        assert float(routing_changed(rec["ids"], free["ids"])[mask].float().mean()) > 0
        assert not bool(routing_changed(rec["ids"], forced["ids"])[mask].any())
        # gradients reach the router weights through the replayed experts' probabilities (no aux loss)
        eng.forward_backward(replay)
        grads = {n: p.main_grad for m in eng.model for n, p in m.named_parameters() if "router" in n}
        assert grads and all(float(g.abs().max()) > 0 for g in grads.values()), list(grads)
    finally:
        eng.load_global_state_dict(w0)


def test_diagnostics_unchanged_weights_r2_and_after_a_step(moe):
    eng, batch, rec, w0 = moe
    same = run_router_diagnostics(eng, batch, rec)
    assert same["router/var_logratio"] == 0.0 and same["router/var_route"] == 0.0
    assert same["router/layer0/change_rate"] == 0.0 and same["router/layer1/change_rate"] == 0.0
    try:
        eng.train_minibatch(batch)  # free routing during the update: the paper's GRPO/SAPO without replay
        free = run_router_diagnostics(eng, batch, rec)
        r2 = run_router_diagnostics(eng, batch, rec, replay=True)
    finally:
        eng.load_global_state_dict(w0)
    parts = free["router/var_route"] + free["router/var_weight"] + 2 * free["router/cov_route_weight"]
    assert free["router/var_logratio"] > 0 and parts == pytest.approx(free["router/var_logratio"], rel=1e-9)
    assert free["router/var_route"] > 0
    assert all(free[f"router/layer{i}/change_rate"] > 0 for i in (0, 1))
    assert r2["router/var_route"] == 0.0 and r2["router/share"] == 0.0
    assert all(r2[f"router/layer{i}/change_rate"] == 0.0 for i in (0, 1))
    assert r2["router/var_logratio"] == pytest.approx(free["router/var_weight"], rel=1e-9)


def test_training_forward_capture(moe):
    """The routing of forward_backward's own forward, in batch order: pi_old's at unchanged weights, exactly
    the forced one under replay, and a plain metrics dict (no capture) when not asked."""
    eng, batch, rec, w0 = moe
    mask = batch["loss_mask"] > 0
    plain = eng.forward_backward(batch)
    metrics, same = eng.forward_backward(batch, record_routing=True)
    assert isinstance(plain, dict) and metrics["loss"] == plain["loss"]
    assert same["ids"].shape == rec["ids"].shape and torch.equal(same["ids"][mask], rec["ids"][mask])
    torch.testing.assert_close(same["probs"][mask], rec["probs"][mask])
    forced_ids = torch.roll(rec["ids"], 1, dims=1)  # another token's sets: far from the free routing
    _, forced = eng.forward_backward(dict(batch, **{REPLAY_KEY: forced_ids}), record_routing=True)
    assert torch.equal(forced["ids"][mask], forced_ids[mask])
    try:
        _, routing_used = eng.train_minibatch(batch, record_routing=True)
        assert torch.equal(routing_used["ids"][mask], rec["ids"][mask])  # the update's forward ran at W0
        _, moved = eng.forward_backward(batch, record_routing=True)
        assert bool(routing_changed(rec["ids"], moved["ids"])[mask].any())
    finally:
        eng.load_global_state_dict(w0)


def _router_step(eng, batch, rec, mode, rollout_ids=None):
    """Two mini-batch updates of a RouterStep-instrumented step, as the trainer runs them."""
    step = RouterStep(eng, batch, rec, mode, rollout_ids)
    if mode != "none":
        batch = dict(batch, **{REPLAY_KEY: rec["ids"]})
    mbs = minibatches(batch, 2)
    direct = []
    for k, mb in enumerate(mbs):
        step.before_update(k, mb)
        # the decomposition's inputs, computed directly on the sampled leading rows of this mini-batch
        # (step.per_minibatch of them) with their rows of pi_old's routing
        n = step.per_minibatch
        sub = {key: mb[key][:n] for key in ("tokens", "loss_mask", "advantages", "old_log_probs")}
        lp_replay = eng.compute_log_probs(dict(sub, **{REPLAY_KEY: rec["ids"][2 * k : 2 * k + n]}))
        direct.append(decompose(lp_replay, lp_replay, sub["old_log_probs"], sub["loss_mask"]))
        _, routing_used = eng.train_minibatch(mb, record_routing=True)
        step.after_update(k, mb, routing_used)
    return step.metrics(), direct


def test_router_step_per_minibatch_free_routing(moe):
    eng, batch, rec, w0 = moe
    try:
        m, direct = _router_step(eng, batch, rec, "none")
    finally:
        eng.load_global_state_dict(w0)
    # update 0 is on-policy: only float noise (the mini-batch pads to its own length, pi_old's pass to the
    # batch's), and not one routing change
    assert "router/minibatch0/var_logratio" not in m and m["router/minibatch0/train_change_rate"] == 0.0
    assert m["router/minibatch1/var_logratio"] > 0 and m["router/minibatch1/var_route"] > 0
    parts = (
        sum(m[f"router/minibatch1/{k}"] for k in ("var_route", "var_weight"))
        + 2 * m["router/minibatch1/cov_route_weight"]
    )
    assert parts == pytest.approx(m["router/minibatch1/var_logratio"], rel=1e-9)
    # var_weight uses mini-batch 1's own rows of pi_old's routing (offset) and the weights after update 0
    assert m["router/minibatch1/var_weight"] == pytest.approx(float(direct[1]["var_weight"]), rel=1e-9)
    assert 0 < m["router/minibatch1/train_change_rate"] <= 1
    layer_rates = [m[f"router/layer{i}/train_change_rate"] for i in (0, 1)]
    assert max(layer_rates) > 0 and "router/layer0/rollout_change_rate" not in m
    # mini-batch 0 changed nothing, so the step's rate is mini-batch 1's, weighted by its share of tokens
    mask = batch["loss_mask"]
    share = float(mask[2:].double().sum() / mask.double().sum())
    assert sum(layer_rates) / 2 == pytest.approx(m["router/minibatch1/train_change_rate"] * share, rel=1e-9)


def test_router_step_r2_and_r3_rollout_change_rate(moe):
    eng, batch, rec, w0 = moe
    try:
        r2, _ = _router_step(eng, batch, rec, "r2")
        eng.load_global_state_dict(w0)
        g = torch.Generator().manual_seed(3)
        rollout = torch.rand(*rec["ids"].shape[:3], 4, generator=g).topk(2, -1).indices.to(torch.int16)
        rollout[:, -3:] = -1  # tokens the rollout engine did not report
        r3 = RouterStep(eng, batch, rec, "r3", rollout).metrics()
    finally:
        eng.load_global_state_dict(w0)
    assert r2["router/minibatch1/var_route"] == 0.0
    assert r2["router/minibatch0/train_change_rate"] == r2["router/minibatch1/train_change_rate"] == 0.0
    assert r2["router/minibatch1/var_logratio"] > 0  # the weights did move
    # r3: pi_old's free routing at W0 is `rec`; the rates are against it, not against the replayed routing
    want = rollout_change_rates(rollout, rec["ids"], batch["loss_mask"], [0, 1])
    for i in (0, 1):
        got = r3[f"router/layer{i}/rollout_change_rate"]
        assert got == pytest.approx(float(want[f"layer{i}/rollout_change_rate"]), rel=1e-9) and 0.4 < got < 1


def test_dense_model_reports_no_router_terms(moe):
    from megatron_sapo.megatron.engine import MegatronEngine

    eng, *_ = moe
    eng.shutdown()  # one engine (one set of megatron groups) at a time
    dense = MegatronEngine(_config(num_experts=0))
    try:
        batch = _batch()
        lp, rec = dense.compute_log_probs(batch, record_routing=True)
        assert dense.routing is None and rec is None
        batch["old_log_probs"] = lp
        assert run_router_diagnostics(dense, batch, rec) == {}
    finally:
        dense.shutdown()
