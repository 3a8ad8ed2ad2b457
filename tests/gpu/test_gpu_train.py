"""Single GPU: a bf16 SAPO step against the fp32 model on the same weights, the GPU spec's log-probs (Transformer
Engine where installed) against the HF model at TP1 (both token dispatchers), and r2 routing replay. Skipped
without CUDA (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sapo.config import load_config
from megatron_sapo.megatron.routing import REPLAY_KEY
from tests.batches import right_padded_batch

pytestmark = pytest.mark.gpu

VOCAB = 64


def _engine(*overrides):
    from megatron_sapo.megatron.engine import MegatronEngine

    return MegatronEngine(load_config(None, [f"model.vocab_size={VOCAB}", "train.micro_batch_size=2", *overrides]))


def _grads(engine) -> dict[str, torch.Tensor]:
    from megatron_sapo.megatron.weights import gather_global

    return gather_global(engine.model, "grad")


def _global_rel(got: dict, ref: dict) -> float:
    """||got - ref|| / ||ref|| over all tensors of ref together."""
    num = sum(float((got[k] - r).pow(2).sum()) for k, r in ref.items())
    den = sum(float(r.pow(2).sum()) for r in ref.values())
    return math.sqrt(num / max(den, 1e-30))


# ----------------------------------------------------------------------------------------------------------
# (a) bf16 vs fp32
# ----------------------------------------------------------------------------------------------------------
def test_bf16_sapo_step_is_finite_and_close_to_fp32():
    batch = right_padded_batch(n=4, s=24, vocab=VOCAB, seed=1, response=6)
    mask = batch["loss_mask"] > 0
    fp32 = _engine("model.dtype=fp32")
    try:
        # bf16-representable weights: both models then hold exactly the same weights, only the arithmetic differs
        w0 = {k: v.bfloat16().float() for k, v in fp32.global_state_dict().items()}
        fp32.load_global_state_dict(w0)
        lp32 = fp32.compute_log_probs(batch)
        noise = torch.randn(lp32.shape, generator=torch.Generator().manual_seed(3))
        batch["old_log_probs"] = (lp32 + 0.2 * noise) * batch["loss_mask"]
        loss32 = fp32.forward_backward(batch)["loss"]
        grads32 = _grads(fp32)
    finally:
        fp32.shutdown()

    bf16 = _engine("model.dtype=bf16", "optim.lr=1e-3")
    try:
        assert bf16.tcfg.bf16 and bf16.tcfg.params_dtype == torch.bfloat16
        assert bf16.model[0].module.embedding.word_embeddings.weight.dtype == torch.bfloat16
        bf16.load_global_state_dict(w0)
        lp16 = bf16.compute_log_probs(batch)
        loss16 = bf16.forward_backward(batch)["loss"]
        grads16 = _grads(bf16)
        step = bf16.train_minibatch(batch)
        moved = max(float((t - w0[k]).abs().max()) for k, t in bf16.global_state_dict().items())
    finally:
        bf16.shutdown()

    assert math.isfinite(loss16) and math.isfinite(step["loss"])
    assert step["update_ok"] == 1.0 and math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    assert moved > 0  # the optimizer step wrote the bf16 weights
    # Per-token log-probs: bf16 rounds activations to 2^-8 relative; the tiny model's logits are O(0.1-1), so
    # the expected error is ~1e-3 (a router near-tie flipped by the rounding moves a token by ~1e-2 at init
    # scale). 0.05 leaves 5-50x headroom while a wrong bf16 path (e.g. no fp32 softmax) is O(0.1-1).
    dlp = float((lp16 - lp32)[mask].abs().max())
    assert dlp < 0.05, dlp
    # Loss: by the mean value theorem |dloss| <= max|A| * max(w r) * max|dlp| with the SAPO gate weight w <= 1
    # and r = exp(lp - old) (its largest value, widened by dlp): a bound derived from the measured dlp.
    log_ratio = float((lp32 - batch["old_log_probs"])[mask].abs().max())
    bound = float(batch["advantages"].abs().max()) * math.exp(log_ratio + dlp) * dlp + 1e-5
    assert abs(loss16 - loss32) <= bound, (loss16, loss32, bound)
    # Gradients (fp32 main grads, bf16 activations): a few bf16 roundings deep, ~1-3% relative; 0.1 is the bound,
    # far below the O(1) error of a missing or doubled gradient term.
    assert sorted(grads16) == sorted(grads32)
    assert _global_rel(grads16, grads32) < 0.1


# ----------------------------------------------------------------------------------------------------------
# (b) Transformer Engine spec vs the HF model, TP1
# ----------------------------------------------------------------------------------------------------------
def _hf_model(engine):
    from megatron_sapo.rollout.local import build_hf_model
    from megatron_sapo.rollout.weights import megatron_to_hf

    model = build_hf_model(engine.cfg.model)
    model.load_state_dict(megatron_to_hf(engine.global_state_dict(), engine.cfg.model), strict=True)
    return model


@torch.no_grad()
def hf_reference(model, tokens: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF model's log-probs [N, S-1] of tokens[:, 1:] and its routing ids [N, S-1, L, K] in the engine's
    replay layout (position t: the experts of input token tokens[:, t])."""
    n, s = tokens.shape
    out = model(tokens, output_router_logits=True)
    lp = torch.log_softmax(out.logits.float(), -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    ids = [logits.float().view(n, s, -1).topk(topk, dim=-1).indices[:, :-1] for logits in out.router_logits]
    return lp, torch.stack(ids, dim=2)


def _uses_transformer_engine(engine) -> bool:
    return any(type(m).__module__.startswith("transformer_engine") for m in engine.model[0].modules())


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_gpu_spec_log_probs_match_hf_at_tp1(dispatcher):
    from megatron_sapo.megatron.model import have_transformer_engine

    eng = _engine("model.dtype=fp32", "parallel.tp=1", f"model.moe_dispatcher={dispatcher}")
    try:
        assert eng.tcfg.tensor_model_parallel_size == 1 and eng.tcfg.moe_token_dispatcher_type == dispatcher
        # the spec follows the install: TE layers and grouped GEMM where TE imports, megatron's local spec else
        te = have_transformer_engine()
        assert _uses_transformer_engine(eng) == te and eng.tcfg.moe_grouped_gemm == te
        model = _hf_model(eng)
        batch = right_padded_batch(n=4, s=24, vocab=VOCAB, seed=2, response=6)
        mask = batch["loss_mask"] > 0
        ref, hf_ids = hf_reference(model, batch["tokens"], eng.tcfg.moe_router_topk)
        # Forced to the HF model's expert sets, only arithmetic differs: TE's fp32 GEMMs (TF32 where TE picks
        # it, 2^-11 relative) on logits of O(0.1) give ~1e-4; 1e-3 as in test_gpu_engine.py.
        replay = dict(batch, **{REPLAY_KEY: hf_ids})
        lp = eng.compute_log_probs(replay)
        assert float((lp - ref)[mask].abs().max()) < 1e-3
        # the training forward (forward_backward's own log-probs and routing) agrees as well
        metrics, used = eng.forward_backward(dict(replay, old_log_probs=lp), record_routing=True)
        assert math.isfinite(metrics["loss"])
        assert torch.equal(used["ids"][mask].long(), hf_ids[mask].long())
        assert float((used["log_probs"] - ref)[mask].abs().max()) < 1e-3
        # Free routing picks the same expert sets as HF except at near-ties (router logit gaps below the GEMM
        # rounding): a handful of decisions at most, so >= 90% agreement.
        _, rec = eng.compute_log_probs(batch, record_routing=True)
        same = (rec["ids"].long().sort(-1).values == hf_ids.sort(-1).values).all(-1)[mask]
        assert float(same.float().mean()) >= 0.9
    finally:
        eng.shutdown()


# ----------------------------------------------------------------------------------------------------------
# (c) r2 routing replay on GPU (as tests/unit/test_router_engine.py on CPU; bf16 by default on GPU)
# ----------------------------------------------------------------------------------------------------------
def test_r2_replay_reproduces_recorded_routing_on_gpu():
    from megatron_sapo.diagnostics.router import routing_changed
    from megatron_sapo.megatron.engine import MegatronEngine
    from tests.unit.test_router_engine import _batch, _config

    eng = MegatronEngine(_config())
    try:
        assert eng.routing is not None
        batch = _batch()
        mask = batch["loss_mask"] > 0
        lp, rec = eng.compute_log_probs(batch, record_routing=True)
        batch["old_log_probs"] = lp
        assert bool((rec["ids"][mask] >= 0).all())
        replay = dict(batch, **{REPLAY_KEY: rec["ids"]})
        # another token's expert sets, far from the free routing: the training forward must use exactly those
        forced_ids = torch.roll(rec["ids"], 1, dims=1)
        _, forced = eng.forward_backward(dict(batch, **{REPLAY_KEY: forced_ids}), record_routing=True)
        assert torch.equal(forced["ids"][mask], forced_ids[mask])
        assert bool(routing_changed(rec["ids"], forced_ids)[mask].any())  # the forced routing is not pi_old's
        eng.train_minibatch(replay)  # lr 3e-2 (the helper's config): the free routing moves after one step
        _, free = eng.compute_log_probs(batch, record_routing=True)
        _, again = eng.compute_log_probs(replay, record_routing=True)
        assert float(routing_changed(rec["ids"], free["ids"])[mask].float().mean()) > 0
        assert not bool(routing_changed(rec["ids"], again["ids"])[mask].any())
        # gradients reach the router through the replayed experts' probabilities (the helper has no aux loss)
        eng.forward_backward(replay)
        grads = {n: p.main_grad for m in eng.model for n, p in m.named_parameters() if "router" in n}
        assert grads and all(float(g.abs().max()) > 0 for g in grads.values()), list(grads)
    finally:
        eng.shutdown()
