"""Training curves from metrics.jsonl as PNGs (matplotlib, headless). Used at the end of a run and by
tools/plot_metrics.py on any run folder."""

from __future__ import annotations

import os

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


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write plots/<figure>.png for every figure with data; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if not r.get("skipped")]
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, keys in FIGURES.items():
        series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 50 else None)
        ax.set_xlabel("rollout step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
