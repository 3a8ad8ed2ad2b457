"""The weight sync's streamed path at world size 1: the trainer's buckets of per-layer / per-expert tensors, their
HF mapping, a sharded HF checkpoint written bucket by bucket, and the local engine loading buckets."""

import json
import os

import pytest
import torch

from megatron_sapo.config import load_config
from megatron_sapo.megatron.weights import unit_name
from megatron_sapo.rollout.local import LocalEngine
from megatron_sapo.rollout.weights import load_hf_state, megatron_to_hf, save_hf_buckets, save_hf_checkpoint


@pytest.fixture(scope="module")
def engine_and_cfg():
    from megatron_sapo.megatron.engine import MegatronEngine

    cfg = load_config(None, ["model.vocab_size=64", "model.num_layers=2", "model.num_experts=4"])
    engine = MegatronEngine(cfg)
    yield engine, cfg
    engine.shutdown()


def _hf_streamed(engine, cfg, bucket_mb):
    return [megatron_to_hf(b, cfg.model) for b in engine.weight_buckets(bucket_mb, dst=0)]


def test_unit_names():
    assert unit_name("embedding.word_embeddings.weight", ()) == "embedding.word_embeddings.weight"
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert unit_name(key, (1, 3)) == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    assert unit_name("decoder.layers.mlp.router.weight", (0,)) == "decoder.layers.0.mlp.router.weight"
    with pytest.raises(ValueError, match="unexpected stacked axes"):
        unit_name("decoder.layers.mlp.router.weight", (0, 1))


def test_streamed_buckets_equal_the_full_gather(engine_and_cfg):
    engine, cfg = engine_and_cfg
    full = megatron_to_hf(engine.global_state_dict(), cfg.model)
    limit_mb = 0.03
    buckets = _hf_streamed(engine, cfg, limit_mb)
    assert len(buckets) > 4
    names = [n for b in buckets for n in b]
    assert len(names) == len(set(names)) and sorted(names) == sorted(full)
    assert all(torch.equal(b[n], full[n]) for b in buckets for n in b)
    # a bucket is at most the limit unless one Megatron tensor alone is larger (fc1 maps to gate + up)
    for b in buckets:
        size = sum(t.numel() * t.element_size() for t in b.values())
        assert size <= limit_mb * 2**20 or len({n.rsplit(".", 2)[0] for n in b}) <= 2


def test_sharded_hf_checkpoint_round_trip(engine_and_cfg, tmp_path):
    engine, cfg = engine_and_cfg
    buckets = _hf_streamed(engine, cfg, 0.05)
    out = str(tmp_path / "ckpt")
    save_hf_checkpoint({"stale": torch.zeros(1)}, cfg.model, out)  # an earlier single-file write in the folder
    save_hf_buckets(iter(buckets), cfg.model, out)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) == len(buckets) and "model.safetensors" not in files  # the stale copy is gone
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(weight_map) == sorted(n for b in buckets for n in b)
    loaded = load_hf_state(out)
    assert all(torch.equal(loaded[n], t) for b in buckets for n, t in b.items())


def test_local_engine_loads_streamed_buckets(engine_and_cfg):
    engine, cfg = engine_and_cfg
    local = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    buckets = _hf_streamed(engine, cfg, 0.05)
    local.update_weights(iter(buckets), version=5)
    state = local.model.state_dict()
    assert local.weight_version == 5
    assert all(torch.equal(state[n], t) for b in buckets for n, t in b.items())
    with pytest.raises(KeyError, match="missing"):  # a bucket lost on the way is a mapping error, not a no-op
        local.update_weights(iter(buckets[:-1]), version=6)
    assert local.weight_version == 5


def test_streamed_buckets_follow_weight_changes(engine_and_cfg):
    """The sync's shard plan is built once (engine._sync_shards): later syncs still send the current weights,
    after in-place updates and after a parameter's storage is replaced."""
    engine, cfg = engine_and_cfg
    original = engine.global_state_dict()
    _hf_streamed(engine, cfg, 0.05)  # builds the plan
    try:
        engine.load_global_state_dict({k: v + 0.25 for k, v in original.items()})  # in place
        in_place = megatron_to_hf(engine.global_state_dict(), cfg.model)
        assert all(torch.equal(t, in_place[n]) for b in _hf_streamed(engine, cfg, 0.05) for n, t in b.items())
        param = next(p for p in engine.model[0].parameters() if p.dim() == 2)
        param.data = param.data.clone() - 1.0  # new storage: views into the old one would be stale
        moved = megatron_to_hf(engine.global_state_dict(), cfg.model)
        assert not all(torch.equal(moved[n], in_place[n]) for n in moved)
        assert all(torch.equal(t, moved[n]) for b in _hf_streamed(engine, cfg, 0.05) for n, t in b.items())
    finally:
        engine.load_global_state_dict(original)


def test_local_engine_names_a_mismatched_weight(engine_and_cfg):
    engine, cfg = engine_and_cfg
    local = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    state = {n: t for b in _hf_streamed(engine, cfg, 0.05) for n, t in b.items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=f"'{name}' arrived as"):
        local.update_weights(dict(state, **{name: state[name][:-1]}), version=1)
    with pytest.raises(KeyError, match="unexpected.*model.layers.9.mlp.gate.weight"):
        local.update_weights(dict(state, **{"model.layers.9.mlp.gate.weight": torch.zeros(1)}), version=1)
    assert local.weight_version == -1


def test_seeded_init_follows_megatron_init_rules(engine_and_cfg):
    """model.init=seeded draws each tensor with megatron's own init rule: per-tensor std and norms as in
    megatron-core's init of the same model (the megatron-init engine of the fixture), deterministic in the seed."""
    from megatron_sapo.megatron.model import seeded_init

    engine, cfg = engine_and_cfg
    megatron_init = engine.global_state_dict()
    chunks = engine.model
    assert seeded_init(chunks, cfg.model, seed=5) > 10
    seeded = engine.global_state_dict()
    for name, tensor in megatron_init.items():
        if tensor.std() == 0:  # norm weights: ones in both
            assert torch.equal(seeded[name], tensor), name
        else:
            assert seeded[name].std() == pytest.approx(float(tensor.std()), rel=0.15), name
            assert not torch.equal(seeded[name], tensor)
    seeded_init(chunks, cfg.model, seed=5)
    again = engine.global_state_dict()
    assert all(torch.equal(again[k], seeded[k]) for k in seeded)
    seeded_init(chunks, cfg.model, seed=6)
    assert not torch.equal(engine.global_state_dict()["embedding.word_embeddings.weight"],
                           seeded["embedding.word_embeddings.weight"])  # fmt: skip
    engine.load_global_state_dict(megatron_init)
