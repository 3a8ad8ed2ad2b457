"""Megatron -> HF weight mapping: the HF model (what the local engine and SGLang serve) computes the same
log-probs as the Megatron policy on the same weights."""

import pytest
import torch

from megatron_sapo.config import load_config
from megatron_sapo.rollout.local import LocalEngine, build_hf_model
from megatron_sapo.rollout.weights import megatron_to_hf, split_qkv


@pytest.fixture(scope="module")
def engines():
    from megatron_sapo.megatron.engine import MegatronEngine

    cfg = load_config(None, ["model.vocab_size=64", "model.num_query_groups=2", "rollout.temperature=0.8"])
    engine = MegatronEngine(cfg)
    yield cfg, engine
    engine.shutdown()


def _hf_log_probs(model, tokens, temperature=0.8):
    """At the rollout temperature, as the trainer computes them."""
    with torch.no_grad():
        logits = model(tokens).logits.float() / temperature
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


def test_hf_model_matches_megatron_log_probs(engines):
    cfg, engine = engines
    hf_state = megatron_to_hf(engine.global_state_dict(), cfg.model)
    model = build_hf_model(cfg.model)
    missing, unexpected = model.load_state_dict(hf_state, strict=True)
    assert not missing and not unexpected
    tokens = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "loss_mask": torch.ones(4, 23), "advantages": torch.zeros(4)}
    megatron_lp = engine.compute_log_probs(batch)
    hf_lp = _hf_log_probs(model, tokens)
    assert (megatron_lp - hf_lp).abs().max().item() < 1e-5
    # negative control: a wrong q/k split (no per-group interleave) must be detected
    broken = dict(hf_state)
    q = broken["model.layers.0.self_attn.q_proj.weight"]
    broken["model.layers.0.self_attn.q_proj.weight"] = q.roll(16, dims=0)
    model.load_state_dict(broken)
    assert (engine.compute_log_probs(batch) - _hf_log_probs(model, tokens)).abs().max().item() > 1e-3


def test_local_engine_samples_carry_consistent_log_probs(engines):
    cfg, engine = engines
    local = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    local.update_weights(megatron_to_hf(engine.global_state_dict(), cfg.model), version=3)
    from megatron_sapo.rollout.base import SamplingParams

    params = SamplingParams(n=3, max_new_tokens=6, temperature=cfg.rollout.temperature, seed=7)
    samples = local.generate([[1, 5, 6, 7], [1, 9]], params)
    assert [s.group for s in samples] == [0, 0, 0, 1, 1, 1]
    assert all(s.weight_version == 3 and len(s.response_ids) == len(s.rollout_log_probs) for s in samples)
    assert all(s.finish_reason == ("stop" if s.response_ids[-1] == 2 else "length") for s in samples)
    again = local.generate([[1, 5, 6, 7], [1, 9]], params)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]  # seeded
    # the trainer's log-probs of the sampled tokens (at the same temperature) equal the engine's
    from megatron_sapo.data.collate import collate_samples

    batch = collate_samples(samples, pad_id=0)
    batch["advantages"] = torch.zeros(len(samples))
    n = len(samples)
    pad = (-n) % cfg.train.micro_batch_size  # the engine wants whole micro-batches
    batch = {k: torch.cat([v, v[:pad]]) for k, v in batch.items()}
    trainer_lp = engine.compute_log_probs(batch)[:n]
    mask = batch["loss_mask"][:n]
    diff = ((trainer_lp - batch["rollout_log_probs"][:n]) * mask).abs().max().item()
    assert diff < 1e-4, diff


def test_split_qkv_groups_heads():
    cfg = load_config(None, ["model.num_query_groups=2"]).model  # 4 heads of 16, 2 groups
    rows = torch.arange(2 * (2 + 2) * 16, dtype=torch.float32).view(-1, 1)
    q, k, v = split_qkv(rows, cfg)
    assert q.shape[0] == 64 and k.shape[0] == 32 and v.shape[0] == 32
    assert q[:32, 0].tolist() == list(range(32)) and k[:16, 0].tolist() == list(range(32, 48))
    assert v[:16, 0].tolist() == list(range(48, 64)) and q[32:, 0].tolist() == list(range(64, 96))


def test_unknown_megatron_name_is_an_error():
    cfg = load_config(None, []).model
    with pytest.raises(KeyError, match="no HF name for Megatron weight 'decoder.layers.0.mlp.mystery.weight'"):
        megatron_to_hf({"decoder.layers.0.mlp.mystery.weight": torch.zeros(1)}, cfg)


def test_hf_to_megatron_inverts_the_export_exactly(engines, tmp_path):
    from megatron_sapo.rollout.weights import hf_to_megatron, load_hf_state, save_hf_checkpoint

    cfg, engine = engines
    megatron_state = engine.global_state_dict()
    save_hf_checkpoint(megatron_to_hf(megatron_state, cfg.model), cfg.model, str(tmp_path / "hf"))
    back = hf_to_megatron(load_hf_state(str(tmp_path / "hf")), megatron_state, cfg.model)
    assert back.keys() == megatron_state.keys()
    for key, tensor in megatron_state.items():
        assert torch.equal(back[key], tensor), key
    # an HF model's own random weights load into the engine and give the HF model's log-probs
    model = build_hf_model(cfg.model)
    before = {k: v.clone() for k, v in megatron_state.items()}
    engine.load_global_state_dict(hf_to_megatron(model.state_dict(), megatron_state, cfg.model))
    try:
        tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
        lp = engine.compute_log_probs({"tokens": tokens, "loss_mask": torch.ones(4, 15), "advantages": torch.zeros(4)})
        assert (lp - _hf_log_probs(model, tokens)).abs().max().item() < 1e-5
    finally:
        engine.load_global_state_dict(before)
    wrong = dict(model.state_dict())
    wrong["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), the model needs \(64,\)"):
        hf_to_megatron(wrong, megatron_state, cfg.model)
    del wrong["model.norm.weight"]
    with pytest.raises(KeyError, match="missing"):
        hf_to_megatron(wrong, megatron_state, cfg.model)
