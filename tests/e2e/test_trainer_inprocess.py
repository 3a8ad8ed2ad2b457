"""The RL loop in-process (world size 1) on the real engines: dynamic sampling, NaN rewards, bad data."""

import json
import math
import os
import re

import pytest

from megatron_sapo.config import ConfigError, load_config
from megatron_sapo.data.datasets import DataError
from megatron_sapo.rewards.registry import REWARDS, register_reward

if "e2e_constant" not in REWARDS:
    register_reward("e2e_constant", description="always 1: a group with no learning signal")(lambda c, s: 1.0)
if "e2e_nan" not in REWARDS:
    register_reward("e2e_nan", description="a broken verifier that returns NaN")(lambda c, s: math.nan)


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path, data_file, *overrides):
    return load_config(
        "examples/tiny_moe_cpu.yaml",
        [
            f"data.paths=[{data_file}]",
            f"run.dir={tmp_path / 'run'}",
            "rollout.max_new_tokens=4",
            "checkpoint.resume=none",
            "model.dtype=fp32",
            *overrides,
        ],
    )  # fmt: skip  (fp32 also on a GPU, where "auto" is bf16: the tests compare weights exactly)


def _train(cfg):
    from megatron_sapo.trainer import train

    return train(cfg)


def test_dynamic_sampling_drops_and_refills_uniform_groups(tmp_path):
    rows = [{"prompt": f"copy:{i}{i}{i}=", "answer": f"{i}{i}{i}", "task": "copy"} for i in range(8)]
    rows += [{"prompt": f"const:{i}=", "answer": "1", "task": "e2e_constant"} for i in range(8)]
    cfg = _cfg(tmp_path, _write_rows(tmp_path / "mix.jsonl", rows), "train.steps=2", "algo.dynamic_sampling=true")
    history = _train(cfg)
    assert len(history) == 2
    dropped = sum(m["dynamic_sampling/dropped_groups"] for m in history)
    assert dropped > 0  # the constant-reward prompts were sampled and dropped
    for m in history:
        kept_copy_groups = cfg.rollout.prompts_per_step - m["dynamic_sampling/filled_groups"]
        assert kept_copy_groups >= 1
        assert m["reward_mean"] < 1.0  # a batch of only constant groups would average exactly 1


def test_nan_rewards_skip_steps_then_stop_with_a_clear_message(tmp_path):
    from megatron_sapo.trainer import TrainingStopped

    rows = [{"prompt": f"x{i}=", "answer": "1", "task": "e2e_nan"} for i in range(8)]
    cfg = _cfg(tmp_path, _write_rows(tmp_path / "nan.jsonl", rows), "train.steps=5", "train.max_skipped_steps=2")
    with pytest.raises(TrainingStopped, match=r"2 consecutive steps skipped \(NaN reward\)"):
        _train(cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["skipped"] == 1.0  # the first skip was logged
    row = json.loads(lines[0])  # with every CONTRACT key; those the skip never computed are null
    from megatron_sapo.trainer import ROW_KEYS

    assert set(ROW_KEYS) | {"gate_mean", "step", "weight_version"} <= set(row)
    assert row["loss"] is None and row["gate_mean"] is None and row["time_rollout_s"] > 0


def test_bad_data_files_name_the_culprit(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "copy:1=", "answer": "1", "task": "copy"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl.*line 2"):
        _train(_cfg(tmp_path, str(bad), "train.steps=1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        _train(_cfg(tmp_path, str(empty), "train.steps=1"))
    missing = _write_rows(tmp_path / "missing.jsonl", [{"prompt": "copy:1=", "task": "copy"}])
    with pytest.raises(DataError, match=r"missing.jsonl.*answer"):
        _train(_cfg(tmp_path, missing, "train.steps=1"))


def test_command_line_reports_bad_input_in_one_line(tmp_path, capsys):
    """CONTRACT: bad input exits non-zero with one clear line naming the culprit, not a traceback: a broken
    data file, a checkpoint.resume path that is not a complete checkpoint, diagnose's checkpoint paths."""
    from megatron_sapo.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "copy:1=", "answer": "1", "task": "copy"}\n{"prompt": oops}\n')
    train = ["train", "examples/tiny_moe_cpu.yaml", f"run.dir={tmp_path / 'run'}", "train.steps=1"]
    half_written = tmp_path / "run" / "checkpoints" / "step_3"
    half_written.mkdir(parents=True)  # no COMPLETE marker
    cases = [
        (train + [f"data.paths=[{bad}]"], r"megatron-sapo train: error: .*bad\.jsonl, line 2: not valid JSON"),
        (train + [f"checkpoint.resume={half_written}"], r"checkpoint\.resume=.*step_3'?: not a complete checkpoint"),
        (["diagnose", "examples/tiny_moe_cpu.yaml", "--old", str(half_written)], r"diagnose --old .*step_3: not a"),
    ]
    for argv, culprit in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and re.search(culprit, errors[0]), err
    # two ranks (a torchrun relaunch): after torchrun's own failure report, the culprit is the last line, exit 2
    assert main(cases[0][0] + ["parallel.dp=2", "train.micro_batch_size=4"]) == 2
    assert re.search(cases[0][1], capsys.readouterr().err.splitlines()[-1])


def test_plot_tool_writes_pngs_from_a_recorded_run(tmp_path):
    from megatron_sapo.diagnostics.plots import plot_run

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i, "reward_mean": 0.1 * i, "ratio_std": 0.01, "gate_mean": 0.99, "loss": -0.1} for i in (1, 2, 3)]
    rows.append({"step": 4, "skipped": 1.0})
    _write_rows(run / "metrics.jsonl", rows)
    written = plot_run(str(run))
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["gate_and_clip.png", "loss_and_grad.png", "ratio.png", "reward.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_kl_penalty_uses_the_initial_policy_as_reference(tmp_path):
    """The reference is the initial policy (here model.hf_path's weights), copied shard by shard and kept in
    the run folder as a weights-only checkpoint; a resumed run takes it from there, not from hf_path (changed
    below) nor from the resumed policy."""
    import torch

    from megatron_sapo.data.tokenizer import build_tiny_tokenizer
    from megatron_sapo.rollout.local import build_hf_model
    from megatron_sapo.rollout.weights import megatron_to_hf, save_hf_checkpoint
    from megatron_sapo.trainer import REFERENCE_DIR, Trainer

    rows = [{"prompt": f"copy:{i}{i}{i}=", "answer": f"{i}{i}{i}", "task": "copy"} for i in range(8)]
    data = _write_rows(tmp_path / "copy.jsonl", rows)
    hf = str(tmp_path / "hf")
    cfg = _cfg(tmp_path, data, "train.steps=2", "algo.kl_coef=0.1", f"model.hf_path={hf}", "checkpoint.resume=auto")
    initial = build_hf_model(cfg.model).state_dict()
    save_hf_checkpoint(initial, cfg.model, hf)
    build_tiny_tokenizer(hf)
    killed = tmp_path / "run" / f"{REFERENCE_DIR}.tmp"  # an earlier write killed midway: never loaded
    killed.mkdir(parents=True)
    (killed / "junk").write_text("half a checkpoint")
    history = _train(cfg)
    # step 1's first mini-batch runs on the initial weights: policy == reference, so its KL starts at 0 and
    # grows as the policy moves; it is reported, and the reference weights were saved for a resume
    assert all("kl_ref" in m for m in history)
    assert 0.0 <= history[0]["kl_ref"] < history[1]["kl_ref"]
    assert (tmp_path / "run" / REFERENCE_DIR).is_dir() and not killed.exists()

    save_hf_checkpoint({k: v + 1.0 for k, v in initial.items()}, cfg.model, hf)
    trainer = Trainer(cfg)  # resumes from step 2
    try:
        assert trainer.step == 2
        reference = megatron_to_hf(trainer.reference.global_state_dict(), cfg.model)
        for name, tensor in initial.items():
            assert torch.equal(reference[name], tensor), name
        policy = megatron_to_hf(trainer.engine.global_state_dict(), cfg.model)
        assert not all(torch.equal(policy[n], reference[n]) for n in initial)  # the resumed, trained weights
    finally:
        trainer.engine.shutdown()
        trainer.rollout.shutdown()


def test_model_hf_path_sets_the_initial_weights(tmp_path):
    import torch

    from megatron_sapo.data.tokenizer import build_tiny_tokenizer
    from megatron_sapo.rollout.local import build_hf_model
    from megatron_sapo.rollout.weights import megatron_to_hf, save_hf_checkpoint
    from megatron_sapo.trainer import Trainer

    rows = [{"prompt": "copy:123=", "answer": "123", "task": "copy"}] * 4
    cfg = _cfg(tmp_path, _write_rows(tmp_path / "d.jsonl", rows), f"model.hf_path={tmp_path / 'hf'}")
    hf_model = build_hf_model(cfg.model)
    save_hf_checkpoint(hf_model.state_dict(), cfg.model, str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="model.hf_path=.*holds no tokenizer"):
        Trainer(cfg)
    build_tiny_tokenizer(str(tmp_path / "hf"))
    trainer = Trainer(cfg)
    try:
        loaded = megatron_to_hf(trainer.engine.global_state_dict(), cfg.model)
        for name, tensor in hf_model.state_dict().items():
            assert torch.equal(loaded[name], tensor), name
    finally:
        trainer.engine.shutdown()


def test_nan_loss_skips_the_update_and_keeps_the_weights(tmp_path):
    import torch

    from megatron_sapo.megatron.engine import MegatronEngine

    cfg = load_config("examples/tiny_moe_cpu.yaml", [f"run.dir={tmp_path}"])
    engine = MegatronEngine(cfg)
    try:
        tokens = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
        batch = {"tokens": tokens, "loss_mask": torch.ones(8, 11), "advantages": torch.ones(8)}
        batch["old_log_probs"] = engine.compute_log_probs(batch)
        before = engine.global_state_dict()
        bad = dict(batch, advantages=torch.tensor([1.0, float("nan")] * 4))
        metrics = engine.train_minibatch(bad)
        assert metrics["update_ok"] == 0.0 and not math.isfinite(metrics["loss"])
        after = engine.global_state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        good = engine.train_minibatch(batch)  # training continues
        assert good["update_ok"] == 1.0 and math.isfinite(good["loss"])
        assert any(not torch.equal(before[k], v) for k, v in engine.global_state_dict().items())
    finally:
        engine.shutdown()


def test_wandb_gets_the_metrics_rows(tmp_path, monkeypatch):
    """logging.wandb_project: every step's metrics (as in metrics.jsonl) reach W&B (offline mode, no network),
    with the resolved config."""
    import glob

    # wandb is an optional extra (the dev extra installs it, so CI runs this); a bare GPU image may lack it
    pytest.importorskip("wandb", reason="logging.wandb_project needs the optional wandb package")
    from megatron_sapo.diagnostics.writer import WANDB_ID_FILE
    from tests.unit.test_writer import _wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"prompt": f"copy:{i}{i}=", "answer": f"{i}{i}", "task": "copy"} for i in range(8)]
    cfg = _cfg(tmp_path, _write_rows(tmp_path / "d.jsonl", rows), "train.steps=2", "logging.wandb_project=e2e")
    history = _train(cfg)
    with open(os.path.join(cfg.run.dir, WANDB_ID_FILE), encoding="utf-8") as f:
        run_id = f.read().strip()
    (run_file,) = glob.glob(os.path.join(cfg.run.dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    logged = _wandb_history(run_file, {int(m["step"]) for m in history})
    for m in history:
        for key in ("loss", "reward_mean", "grad_norm"):
            assert logged[int(m["step"])][key] == pytest.approx(m[key], rel=1e-12), key
