"""Routing replay / capture with activation recompute (model.recompute_granularity), real megatron-core at
world size 1: the recomputed router calls in backward get the forward's routing (megatron/routing.py), so
loss, gradients and the captured routing equal the run without recompute, and nothing is recorded twice."""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.config import ConfigError, validate
from megatron_sapo.megatron.routing import REPLAY_KEY
from tests.unit.test_router_engine import _batch, _config


def _run(granularity: str, w0: dict | None, **recompute):
    """Free-routing and replayed forward_backward on the same batch; what each saw."""
    from megatron_sapo.megatron.engine import MegatronEngine

    cfg = _config()
    cfg.model.recompute_granularity = granularity
    for key, value in recompute.items():
        setattr(cfg.model, f"recompute_{key}", value)
    eng = MegatronEngine(cfg)
    try:
        if w0 is not None:
            eng.load_global_state_dict(w0)
        records = []
        collect = eng.routing.collect

        def counting_collect(*args):  # how many router calls were recorded in the pass
            records.append(len(eng.routing.records))
            return collect(*args)

        eng.routing.collect = counting_collect
        batch = _batch()
        lp, old = eng.compute_log_probs(batch, record_routing=True)
        batch["old_log_probs"] = lp + 0.2 * batch["loss_mask"] * torch.linspace(-1, 1, lp.shape[1])
        out = {"w0": eng.global_state_dict(), "tcfg": eng.tcfg.recompute_granularity, "old": old["ids"]}
        for name, b in (("free", batch), ("replay", dict(batch, **{REPLAY_KEY: torch.roll(old["ids"], 1, 1)}))):
            metrics, routing_used = eng.forward_backward(b, record_routing=True)
            grads = {n: p.main_grad.clone() for m in eng.model for n, p in m.named_parameters()}
            out[name] = (metrics["loss"], routing_used["ids"], grads, eng.routing.recomputed)
        out["records"] = records
        return out
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def baseline():
    return _run("none", None)


@pytest.mark.parametrize(
    "granularity, options",
    [("full", {"method": "uniform", "num_layers": 1}), ("full", {"method": "block", "num_layers": 2}),
     ("selective", {"modules": ["moe"]})],
)  # fmt: skip
def test_recompute_replays_the_forwards_routing(baseline, granularity, options):
    got = _run(granularity, baseline["w0"], **options)
    assert got["tcfg"] == granularity and baseline["tcfg"] is None
    mask = _batch()["loss_mask"] > 0
    for name in ("free", "replay"):
        loss, ids, grads, recomputed = got[name]
        want_loss, want_ids, want_grads, _ = baseline[name]
        # 2 micro-batches x 2 MoE layers, each recomputed once in backward and served the forward's routing
        assert recomputed == 4 and baseline[name][3] == 0
        assert loss == want_loss and torch.equal(ids, want_ids)
        assert set(grads) == set(want_grads)
        for key, g in grads.items():
            torch.testing.assert_close(g, want_grads[key], rtol=0, atol=0, msg=key)
    replayed = got["replay"][1][mask]
    assert torch.equal(replayed, torch.roll(got["old"], 1, 1)[mask])
    # one record per micro-batch and MoE layer, in the forward-only pass and both training passes
    assert got["records"] == baseline["records"] == [4, 4, 4]


def test_recompute_config_is_validated_and_reaches_megatron():
    from megatron_sapo.megatron.model import recompute_kwargs

    cfg = _config()
    cfg.model.recompute_granularity = "full"
    cfg.model.recompute_num_layers = 3  # more than the 2 layers
    with pytest.raises(ConfigError, match="model.recompute_num_layers"):
        validate(cfg)
    cfg.model.num_layers, cfg.model.recompute_num_layers = 3, 2  # uniform units of 2 do not tile 3 layers
    with pytest.raises(ConfigError, match="must divide"):
        validate(cfg)
    cfg.model.recompute_method = "block"
    validate(cfg)
    assert recompute_kwargs(cfg.model) == dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2
    )
    cfg.model.recompute_granularity, cfg.model.recompute_modules = "selective", ["moe", "attention"]
    with pytest.raises(ConfigError, match="model.recompute_modules"):
        validate(cfg)
    cfg.model.recompute_modules = ["moe"]
    assert recompute_kwargs(cfg.model) == dict(recompute_granularity="selective", recompute_modules=["moe"])
    cfg.model.recompute_granularity = "none"
    assert recompute_kwargs(cfg.model) == {}
