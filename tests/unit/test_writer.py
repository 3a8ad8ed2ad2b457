"""Metric sinks: metrics.jsonl, and Weights & Biases (offline mode: no network) when logging.wandb_project is set."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import time

import pytest

from megatron_sapo.config import ConfigError, load_config
from megatron_sapo.diagnostics.writer import WANDB_ID_FILE, MetricsWriter, read_metrics


def _read_wandb_history(run_file: str) -> dict[int, dict]:
    """{step: {key: value}} from an offline .wandb file, read with W&B's own protobuf Record: the file is a
    7-byte header, then LevelDB-log records (crc32, uint16 length, type; 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        data = f.read()
    rows, pos, pending = {}, 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows[int(items.get("_step", record.history.step.num))] = items
    return rows


def _wandb_history(run_file: str, steps: set[int], timeout_s: float = 30.0) -> dict[int, dict]:
    """The file's history once it holds `steps` (or after timeout_s): W&B's service process writes the file,
    and finish() can return before its last buffered block is on disk (a read then finds no or a truncated
    record)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            history = _read_wandb_history(run_file)
        except DecodeError:
            history = {}
        if steps <= set(history) or time.monotonic() > deadline:
            return history
        time.sleep(0.2)


def test_wandb_offline_logs_every_step_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = str(tmp_path)
    writer = MetricsWriter(run_dir, wandb_project="sapo-test", config={"algo": {"loss": "sapo"}})
    writer.write({"step": 1, "loss": 0.5, "reward_mean": 0.1})
    writer.write({"step": 2, "loss": 0.25, "reward_mean": float("nan")})
    writer.close()
    with open(os.path.join(run_dir, WANDB_ID_FILE), encoding="utf-8") as f:
        run_id = f.read().strip()
    (run_file,) = glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    history = _wandb_history(run_file, {1, 2})
    assert {1, 2} <= set(history), f"history steps {sorted(history)} in {run_file} ({os.path.getsize(run_file)} B)"
    assert history[1]["loss"] == 0.5 and history[1]["reward_mean"] == 0.1
    assert history[2]["loss"] == 0.25 and "reward_mean" not in history[2]  # NaN is not logged
    assert [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))] == [1, 2]

    resumed = MetricsWriter(run_dir, resume_after_step=2, wandb_project="sapo-test")
    resumed.write({"step": 3, "loss": 0.125})
    resumed.close()
    # the same W&B run id twice (W&B suffixes the second folder when both start within one second)
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 2
    assert len(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", f"run-{run_id}.wandb"))) == 2


def test_missing_wandb_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="logging.wandb_project='p' needs the wandb package"):
        MetricsWriter(str(tmp_path), wandb_project="p")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb_project"):
        load_config(None, ["logging.wandb_project=p"])
