"""Metric sinks: metrics.jsonl always (one flat object per rollout step), TensorBoard and Weights & Biases when
asked (logging.tensorboard, logging.wandb_project)."""

from __future__ import annotations

import json
import math
import os
import secrets


def _clean(metrics: dict) -> dict:
    """Numbers only; NaN / inf become null so every line stays valid JSON."""
    out = {}
    for key, value in metrics.items():
        if key in ("step", "weight_version"):
            out[key] = int(value)
            continue
        value = float(value)
        out[key] = value if math.isfinite(value) else None
    return out


WANDB_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run continues the same W&B run


def _start_wandb(run_dir: str, project: str, config: dict | None):
    """wandb.init for this run folder; WANDB_MODE=offline (clusters without internet) writes under
    run_dir/wandb for a later `wandb sync`."""
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(
            f"logging.wandb_project={project!r} needs the wandb package: pip install wandb (or unset the key)"
        ) from e
    id_path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B run ids: [a-z0-9]
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    name = os.path.basename(os.path.abspath(run_dir))
    return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=run_dir, config=config or {})


class MetricsWriter:
    def __init__(
        self,
        run_dir: str,
        tensorboard: bool = False,
        resume_after_step: int | None = None,
        wandb_project: str | None = None,
        config: dict | None = None,
    ):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_after_step is not None:
            self._truncate_after(resume_after_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held for the run, closed in close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: logging to metrics.jsonl only")
        # W&B rejects steps at or below its last one: after a resume, the redone steps (never checkpointed)
        # keep their first W&B values, while metrics.jsonl holds the redone ones.
        self._wandb = _start_wandb(run_dir, wandb_project, config) if wandb_project else None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop the lines of steps the resumed run will redo (they were never checkpointed)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, metrics: dict) -> None:
        row = _clean(metrics)
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            step = int(metrics["step"])
            for key, value in row.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=int(row["step"]))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def console_line(m: dict) -> str:
    keys = ("loss", "reward_mean", "response_len_mean", "ratio_std", "gate_mean", "clip_frac", "grad_norm")
    parts = [f"step {int(m['step'])}"] + [f"{k}={m[k]:.4g}" for k in keys if k in m and m[k] is not None]
    parts.append(f"{m.get('tokens_per_s', 0):.0f} tok/s")
    return " | ".join(parts)
