"""Router figures from a run's metrics.jsonl (the router/... metrics of docs CONTRACT.md), as PNGs. Drawn at
the end of a run with router diagnostics (plots.plot_run) and by tools/plot_router_diagnostics.py on any run:

router_change_rate.png   per-layer x step heat map of router/layer{i}/change_rate
router_variance.png      Var(l), Var(l_route), Var(l_weight), 2 Cov and the router share over steps
router_load.png          expert load per layer over steps (load_cv, load_max_mean) and router entropy
router_var_changed.png   Var(l) among routing-changed vs unchanged tokens, per layer, over steps
"""

from __future__ import annotations

import os
import re

from megatron_sapo.diagnostics.writer import read_metrics

LAYER_KEY = re.compile(r"^router/layer(\d+)/(\w+)$")


def router_rows(run_dir: str) -> list[dict]:
    """The run's metrics rows that hold router/... metrics (diagnostic steps), skipped steps left out."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [r for r in rows if not r.get("skipped") and "step" in r and any(k.startswith("router/") for k in r)]


def layer_series(rows: list[dict], name: str) -> tuple[list[int], dict[int, list[float]]]:
    """steps, {layer: values per step (nan where missing)} for router/layer{i}/<name>."""
    steps = [r["step"] for r in rows]
    layers = sorted({int(m.group(1)) for r in rows for k in r if (m := LAYER_KEY.match(k)) and m.group(2) == name})

    def value(row, layer):  # a NaN was logged as null
        v = row.get(f"router/layer{layer}/{name}")
        return float("nan") if v is None else float(v)

    return steps, {i: [value(r, i) for r in rows] for i in layers}


def _change_rate(plt, rows, steps):
    import numpy as np

    _, change = layer_series(rows, "change_rate")
    if not change:
        return None
    grid = np.array([change[i] for i in sorted(change)])
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(steps) + 3), max(2.5, 0.3 * len(change) + 1.5)))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    ax.set_yticks(range(len(change)), [str(i) for i in sorted(change)], fontsize=7)
    ax.set(xlabel="step", ylabel="MoE layer", title="routing change rate (old vs current top-k set)")
    fig.colorbar(im, ax=ax)
    return fig


def _variance(plt, rows, steps):
    keys = ["router/var_logratio", "router/var_route", "router/var_weight", "router/cov_route_weight"]
    if not any(k in r for r in rows for k in keys):
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=key.split("/")[1])
    ax.set(xlabel="step", title="log-ratio variance decomposition")
    ax.legend(fontsize=7)
    pts = [(r["step"], r["router/share"]) for r in rows if "router/share" in r]
    if pts:
        ax2.plot(*zip(*pts), marker="o", ms=3, color="C4")
    ax2.set(xlabel="step", title="router share Var(l_route)/Var(l)")
    return fig


def _load(plt, rows, steps):
    panels = [(n, layer_series(rows, n)[1]) for n in ("load_cv", "load_max_mean", "entropy")]
    panels = [(n, s) for n, s in panels if s]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels):
        for layer, values in series.items():
            ax.plot(steps, values, marker="o", ms=3, label=f"layer {layer}")
        ax.set(xlabel="step", title=f"expert load: {name}" if name != "entropy" else "router entropy")
        ax.legend(fontsize=6)
    return fig


def _var_changed(plt, rows, steps):
    _, changed = layer_series(rows, "var_changed")
    _, unchanged = layer_series(rows, "var_unchanged")
    if not (changed and unchanged):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, layer in enumerate(sorted(changed)):
        ax.plot(steps, changed[layer], marker="o", ms=3, color=f"C{i % 10}", label=f"layer {layer} changed")
        ax.plot(steps, unchanged.get(layer, [float("nan")] * len(steps)), ls="--", color=f"C{i % 10}")
    ax.set(xlabel="step", title="Var(l): routing changed (solid) vs unchanged (dashed)")
    ax.legend(fontsize=6)
    return fig


FIGURES = {  # file name -> figure builder (None when the run lacks its metrics)
    "router_change_rate.png": _change_rate,
    "router_variance.png": _variance,
    "router_load.png": _load,
    "router_var_changed.png": _var_changed,
}


def plot(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the FIGURES the run's router metrics allow into out_dir (default RUN_DIR/plots); their paths."""
    rows = router_rows(run_dir)
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []
    for name, build in FIGURES.items():
        fig = build(plt, rows, steps)
        if fig is not None:
            path = os.path.join(out_dir, name)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
