"""tools/bench_vs_trl.py: our tiny recipe maps onto TRL's GRPOConfig with the same batch geometry (pure
mapping; the GRPOConfig check runs only where trl is installed, e.g. `pip install -e .[bench]`)."""

import importlib.util
import os

import pytest

from megatron_sapo.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", os.path.join(REPO, "tools", "bench_vs_trl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_recipe_maps_to_trl_geometry(bench, tmp_path):
    cfg = bench.load_cfg(6, str(tmp_path))
    kw = bench.trl_config_kwargs(cfg, 6, str(tmp_path / "trl"))
    # one rollout step = 4 prompts x 8 samples, 4 optimizer steps of 8 samples, one micro-batch of 8 each
    assert kw["num_generations"] == 8 and kw["per_device_train_batch_size"] == 8
    assert kw["gradient_accumulation_steps"] == 1 and kw["steps_per_generation"] == 4
    rows_per_generation = kw["per_device_train_batch_size"] * kw["steps_per_generation"]
    assert rows_per_generation == cfg.rollout.prompts_per_step * cfg.rollout.n == 32
    assert kw["steps_per_generation"] // kw["gradient_accumulation_steps"] == cfg.algo.minibatches == 4
    assert kw["max_steps"] == 6 * 4  # TRL counts optimizer steps
    assert kw["loss_type"] == "sapo" and (kw["sapo_temperature_pos"], kw["sapo_temperature_neg"]) == (1.0, 1.05)
    assert kw["beta"] == 0.0 and kw["num_iterations"] == 1 and kw["learning_rate"] == cfg.optim.lr
    assert kw["max_completion_length"] == 8 and kw["temperature"] == 1.0 and kw["top_k"] == 0
    assert kw["use_cpu"] and not kw["bf16"] and not kw["fp16"] and not kw["gradient_checkpointing"]
    assert not kw["use_vllm"] and kw["report_to"] == "none" and not kw["shuffle_dataset"]


def test_geometry_rejects_uneven_splits(bench):
    assert bench.trl_geometry(4, 8, 2, 8) == {
        "num_generations": 8, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
        "steps_per_generation": 4,
    }  # fmt: skip
    with pytest.raises(ValueError, match="mini-batches"):
        bench.trl_geometry(3, 3, 2, 1)
    with pytest.raises(ValueError, match="micro-batches"):
        bench.trl_geometry(4, 8, 4, 3)


def test_unmapped_recipes_are_refused(bench, tmp_path):
    cfg = load_config(None, ["algo.loss=grpo"])
    with pytest.raises(ValueError, match="sapo"):
        bench.trl_config_kwargs(cfg, 2, str(tmp_path))


def test_trl_accepts_the_mapping(bench, tmp_path):
    trl = pytest.importorskip("trl")
    cfg = bench.load_cfg(2, str(tmp_path))
    config = trl.GRPOConfig(**bench.trl_config_kwargs(cfg, 2, str(tmp_path / "trl")))
    assert config.generation_batch_size == 32 and config.steps_per_generation == 4
    assert config.gradient_checkpointing is False and config.bf16 is False


def test_async_bench_overrides_are_valid_config(tmp_path):
    """tools/bench_async_rollout.py: both modes' overrides load through the config validator (a renamed key
    fails here, not after minutes of benchmarking) and differ only in rollout.async_steps."""
    spec = importlib.util.spec_from_file_location("bench_async", os.path.join(REPO, "tools", "bench_async_rollout.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = type("Args", (), {"steps": 4, "engine": "sglang", "sglang_python": "/bin/sh", "port": 31700})()
    cfgs = {mode: load_config(bench.CONFIG, bench.overrides(args, str(tmp_path), mode)) for mode in bench.MODES}
    assert (cfgs["sync"].rollout.async_steps, cfgs["async"].rollout.async_steps) == (0, 1)
    assert cfgs["async"].rollout.engine == "sglang" and cfgs["async"].rollout.sglang.cpu_threads == 1
    cfgs["sync"].rollout.async_steps = 1
    assert cfgs["sync"] == cfgs["async"]


def test_the_fast_preset_is_a_valid_config_that_splits_the_threads(bench, tmp_path):
    for threads, each in ((1, 1), (2, 1), (8, 4)):
        overrides = bench.fast_overrides(threads)
        cfg = load_config(bench.CONFIG, bench.our_overrides(4, str(tmp_path), extra=tuple(overrides)))
        assert cfg.parallel.cpu_threads == each  # the trainer; the child takes as many (cpu_threads_per_process)
        assert cfg.rollout.local_process and cfg.rollout.async_steps == 1 and cfg.algo.old_logprobs == "rollout"
        # the recipe itself is unchanged: TRL's mapping still holds for it
        assert bench.trl_config_kwargs(cfg, 4, str(tmp_path / "trl"))["steps_per_generation"] == 4


def test_tree_memory_counts_shared_pages_once_in_pss(bench):
    import psutil

    me = psutil.Process()
    rss, _ = bench.tree_usage(me)
    pss = bench.tree_pss(me)
    assert 0 < pss <= rss  # shared library pages are split among the processes that map them
