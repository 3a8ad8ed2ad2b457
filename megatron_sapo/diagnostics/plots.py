"""Training curves from metrics.jsonl as PNGs (matplotlib, headless). Used at the end of a run and by
tools/plot_metrics.py on any run folder."""

from __future__ import annotations

import os

from megatron_sapo.diagnostics.router_plots import plot as plot_router
from megatron_sapo.diagnostics.writer import read_metrics

# figure name -> the metric keys drawn in it (missing keys are left out; an empty figure is not written)
FIGURES = {
    "reward": ["reward_mean"],
    "response_length": ["response_len_mean", "response_len_max"],
    "ratio": ["ratio_mean", "ratio_std", "ratio_max", "ratio_min"],
    "gate_and_clip": ["gate_mean", "gate_min", "gate_low_frac", "clip_frac"],
    "mismatch": ["kl_rollout_k3", "mismatch_abs_mean", "approx_kl"],
    "router_share": ["router/share"],
    "loss_and_grad": ["loss", "grad_norm"],
    "throughput": ["tokens_per_s"],
}


def run_rows(run_dir: str) -> list[dict]:
    """The run's metrics.jsonl rows, skipped steps left out."""
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if not r.get("skipped")]


def series_of(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that has a value for key."""
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def line_figure(series: dict[str, list[tuple[int, float]]], title: str, path: str) -> str:
    """One PNG of labelled (step, value) lines; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, marker="." if len(points) < 50 else None)
    ax.set_xlabel("rollout step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write plots/<figure>.png for every figure with data, and the router figures (router_plots) when the run
    logged router diagnostics; returns the paths written."""
    rows = run_rows(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, keys in FIGURES.items():
        series = {k: v for k in keys if (v := series_of(rows, k))}
        if series:
            written.append(line_figure(series, name.replace("_", " "), os.path.join(out_dir, f"{name}.png")))
    return written + plot_router(run_dir, out_dir)  # none without router diagnostics
