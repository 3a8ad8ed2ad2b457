"""Compare runs side by side (tools/compare_runs.py): a table of each metric's mean over the first and last
`window` steps of every run, and one PNG per metric with a line per run. For SAPO vs GRPO vs GSPO, r2 vs
free routing, or two layouts of the same recipe."""

from __future__ import annotations

import os
import re

from megatron_sapo.diagnostics.plots import line_figure, run_rows, series_of

DEFAULT_KEYS = ("reward_mean", "response_len_mean", "loss", "grad_norm", "ratio_std", "kl_rollout_k3", "router/share")


def load_runs(run_dirs: list[str], labels: list[str] | None = None) -> dict[str, list[dict]]:
    """{label: metrics rows}; labels default to the folders' names (made unique)."""
    if labels and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = {}
    for i, run_dir in enumerate(run_dirs):
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run folder?)")
        label = labels[i] if labels else os.path.basename(os.path.normpath(run_dir))
        while label in runs:
            label += "'"
        runs[label] = run_rows(run_dir)
    return runs


def check_keys(runs: dict[str, list[dict]], keys) -> None:
    """ValueError naming the keys no run has, with the keys the runs do have (a typo is not dropped silently)."""
    present = {k for rows in runs.values() for row in rows for k in row}
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(f"--keys {','.join(missing)}: in none of the runs; they have: {', '.join(sorted(present))}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary(runs: dict[str, list[dict]], keys, window: int) -> list[dict]:
    """One row per (run, metric with data): steps, mean of the first / last `window` values, last value."""
    table = []
    for label, rows in runs.items():
        for key in keys:
            values = [v for _, v in series_of(rows, key)]
            if values:
                table.append({"run": label, "metric": key, "steps": len(values), "first": _mean(values[:window]),
                              "last": _mean(values[-window:]), "final": values[-1]})  # fmt: skip
    return table


def format_table(table: list[dict], window: int) -> str:
    lines = [f"{'metric':<20} {'run':<24} {'steps':>5} {f'first {window}':>12} {f'last {window}':>12} {'final':>12}"]
    for row in sorted(table, key=lambda r: (r["metric"], r["run"])):
        nums = " ".join(f"{row[k]:>12.5g}" for k in ("first", "last", "final"))
        lines.append(f"{row['metric']:<20} {row['run']:<24} {row['steps']:>5} {nums}")
    return "\n".join(lines)


def plot_comparison(runs: dict[str, list[dict]], keys, out_dir: str) -> list[str]:
    """compare_<metric>.png per metric that any run has; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key in keys:
        series = {label: points for label, rows in runs.items() if (points := series_of(rows, key))}
        if series:
            name = "compare_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"
            written.append(line_figure(series, key, os.path.join(out_dir, name)))
    return written
