"""Sharded HF checkpoint loading on gloo: TP2xEP2, PP2 and PP2xTP2 with tied embeddings give exactly the
world-size-1 weights, and each rank reads only the HF tensors of its own shards. The same layouts start from
the world-size-1 weights under model.init=seeded.

The world-size-1 load runs in this process; one torchrun launch (4 processes) runs
tests/dist/hf_checkpoint_worker.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("hf_checkpoint_worker.py")
sys.path.insert(0, str(WORKER.parent))
import hf_checkpoint_worker as hw  # noqa: E402

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _write_sharded_hf(hf: dict, folder: Path) -> None:
    """Two safetensors files with an index, layers interleaved between them (as real HF shards)."""
    folder.mkdir(parents=True)
    names = sorted(hf)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in parts.items():
        save_file({n: hf[n].contiguous() for n in part}, str(folder / file))
    weight_map = {n: file for file, part in parts.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _reference(out: Path, tie: bool) -> tuple[dict, dict, list[str]]:
    """World size 1: the seeded initial weights, an HF checkpoint of perturbed initial weights, and the weights
    loading it gives."""
    from megatron_sapo.megatron.engine import MegatronEngine
    from megatron_sapo.rollout.weights import megatron_to_hf

    cfg = hw.make_config(tie=tie)
    engine = MegatronEngine(cfg)
    try:
        initial = engine.global_state_dict()
        g = torch.Generator().manual_seed(11)
        hf = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in megatron_to_hf(initial, cfg.model).items()}
        _write_sharded_hf(hf, out / ("tied" if tie else "untied"))
        engine.load_hf_checkpoint(str(out / ("tied" if tie else "untied")))
        loaded = engine.global_state_dict()
        assert any(not torch.equal(loaded[k], initial[k]) for k in initial)  # the load changed the weights
        return initial, loaded, sorted(hf)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_dist")
    ref, names = {}, {}
    for tie in (False, True):
        key = "tied" if tie else "untied"
        ref[f"initial_{key}"], ref[key], names[key] = _reference(out, tie)
    torch.save(ref, out / "ref.pt")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"torchrun hf_checkpoint_worker (4 processes) failed:\n{tail}")
    return torch.load(out / "multi.pt", weights_only=False), names


@pytest.mark.parametrize("layout", list(hw.LAYOUTS))
def test_global_weights_equal_the_world_size_one_load(results, layout):
    multi, _ = results
    assert multi[layout]["equal"]


@pytest.mark.parametrize("layout", list(hw.LAYOUTS))
def test_seeded_random_init_is_layout_independent(results, layout):
    """model.init=seeded: the same initial weights at TP2xEP2, PP2xDP2 and PP2xTP2 as at world size 1."""
    multi, _ = results
    assert multi[layout]["seeded_init_equal"]


def _layer(name: str) -> int | None:
    match = LAYER.match(name)
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("layout", ["pp2_dp2", "pp2_tp2_sp_tied"])
def test_pipeline_stages_read_only_their_own_layers(results, layout):
    multi, names = results
    all_names = names["tied" if layout.endswith("_tied") else "untied"]
    for rank in multi[layout]["ranks"]:
        stage, read = rank["pp_rank"], rank["read"]
        assert len(read) == len(set(read))  # each tensor read once
        layers = range(2 * stage, 2 * stage + 2)  # 4 layers over 2 stages
        want = {n for n in all_names if _layer(n) in layers}
        # the first stage owns the embedding; the last the final norm and the output layer, which with tied
        # embeddings is a copy of the embedding (read again there)
        want |= {"model.embed_tokens.weight"} if stage == 0 or layout.endswith("_tied") else set()
        want |= {"model.norm.weight"} | ({"lm_head.weight"} & set(all_names)) if stage == 1 else set()
        assert set(read) == want, (stage, sorted(set(read) ^ want)[:5])


def test_expert_parallel_ranks_read_only_their_own_experts(results):
    multi, names = results
    ranks = multi["tp2_ep2_sp"]["ranks"]
    experts_of = {r["ep_rank"]: {int(e) for n in r["read"] for e in EXPERT.findall(n)} for r in ranks}
    assert experts_of == {0: {0, 1}, 1: {2, 3}}
    for rank in ranks:  # 4 layers x 2 local experts x (gate, up, down)
        assert sum(1 for n in rank["read"] if EXPERT.search(n)) == 4 * 2 * 3
        assert {n for n in rank["read"] if not EXPERT.search(n)} == {n for n in names["untied"] if not EXPERT.search(n)}
