"""Sharded HF checkpoint loading (megatron/hf_checkpoint.py) at world size 1: the same weights as the
whole-model inverse (hf_to_megatron), one file or several, and a clear error for each bad checkpoint."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from megatron_sapo.config import load_config
from megatron_sapo.megatron import hf_checkpoint
from megatron_sapo.megatron.hf_checkpoint import HFCheckpointError
from megatron_sapo.rollout.weights import hf_to_megatron, load_hf_state, megatron_to_hf, save_hf_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An engine, its initial weights, and an HF checkpoint of perturbed weights (so a load is visible)."""
    from megatron_sapo.megatron.engine import MegatronEngine

    cfg = load_config(
        None, ["model.vocab_size=64", "model.num_query_groups=2", "model.num_layers=2", "model.dtype=fp32"]
    )  # exact equality, also on a GPU (auto: bf16)
    engine = MegatronEngine(cfg)
    initial = engine.global_state_dict()
    g = torch.Generator().manual_seed(5)
    hf = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in megatron_to_hf(initial, cfg.model).items()}
    path = str(tmp_path_factory.mktemp("hf") / "one_file")
    save_hf_checkpoint(hf, cfg.model, path)
    yield cfg, engine, initial, hf, path
    engine.shutdown()


@pytest.fixture
def engine_restored(setup):
    cfg, engine, initial, hf, path = setup
    yield setup
    engine.load_global_state_dict(initial)


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def _write_sharded(hf: dict, folder, with_index: bool) -> str:
    """Two safetensors files (layers split between them), plus model.safetensors.index.json if asked."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(hf)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in parts.items():
        save_file({n: hf[n].contiguous() for n in part}, os.path.join(folder, file))
    if with_index:
        weight_map = {n: file for file, part in parts.items() for n in part}
        with open(os.path.join(folder, hf_checkpoint.INDEX_FILE), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(folder)


def test_load_equals_the_whole_model_inverse(engine_restored):
    cfg, engine, initial, hf, path = engine_restored
    want = hf_to_megatron(load_hf_state(path), initial, cfg.model)
    assert any(not torch.equal(want[k], initial[k]) for k in initial)  # the load must change the weights
    written = engine.load_hf_checkpoint(path)
    assert written > len(initial)  # per-layer / per-expert shards, fc1 as two slices
    _assert_equal(engine.global_state_dict(), want)


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_checkpoint_with_or_without_index(engine_restored, tmp_path, with_index):
    cfg, engine, initial, hf, path = engine_restored
    folder = _write_sharded(hf, tmp_path / "sharded", with_index)
    engine.load_hf_checkpoint(folder)
    _assert_equal(engine.global_state_dict(), hf_to_megatron(hf, initial, cfg.model))


def test_expected_names_are_the_export_names(setup):
    """The name set computed from the config and the per-layer units equals the full export's names."""
    cfg, engine, initial, hf, path = setup
    from megatron_sapo.megatron.weights import local_units

    local = {name: shape for name, shape, _, _, _ in local_units(engine.model)}
    expected = hf_checkpoint.expected_hf_names(hf_checkpoint.expected_units(local, cfg.model), cfg.model)
    export = megatron_to_hf(initial, cfg.model)
    assert expected == {k: tuple(v.shape) for k, v in export.items()}


def _bad(hf: dict, folder, drop: str | None = None, put: dict | None = None) -> str:
    state = {k: v for k, v in hf.items() if k != drop}
    return _write_sharded({**state, **(put or {})}, folder, with_index=True)


def test_bad_checkpoints_raise_clear_errors_and_change_nothing(setup, tmp_path):
    cfg, engine, initial, hf, path = setup
    down = "model.layers.1.mlp.experts.3.down_proj.weight"
    missing = _bad(hf, tmp_path / "missing", drop=down)
    with pytest.raises(HFCheckpointError, match=rf"{re.escape(missing)}.*lacks 1 tensor.*{down}"):
        engine.load_hf_checkpoint(missing)
    shaped = _bad(hf, tmp_path / "shape", put={"model.norm.weight": torch.ones(3)})
    with pytest.raises(HFCheckpointError, match=r"'model.norm.weight' has shape \(3,\), the model needs \(64,\)"):
        engine.load_hf_checkpoint(shaped)
    extra = _bad(hf, tmp_path / "extra", put={"model.layers.7.mlp.gate.weight": torch.ones(4, 64)})
    with pytest.raises(HFCheckpointError, match=r"does not use.*model.layers.7.mlp.gate.weight"):
        engine.load_hf_checkpoint(extra)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files"):
        engine.load_hf_checkpoint(str(tmp_path / "empty"))
    broken_index = _write_sharded(hf, tmp_path / "index", with_index=True)
    os.remove(os.path.join(broken_index, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        engine.load_hf_checkpoint(broken_index)
    _assert_equal(engine.global_state_dict(), initial)  # every check ran before any weight was written


def test_reads_each_needed_tensor_once(setup, monkeypatch):
    cfg, engine, initial, hf, path = setup
    read = []
    original = hf_checkpoint.HFReader.get
    monkeypatch.setattr(hf_checkpoint.HFReader, "get", lambda self, name: read.append(name) or original(self, name))
    try:
        engine.load_hf_checkpoint(path)
    finally:
        engine.load_global_state_dict(initial)
    assert sorted(read) == sorted(hf)
