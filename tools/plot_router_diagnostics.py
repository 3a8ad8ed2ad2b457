#!/usr/bin/env python
"""Router figures from a run's metrics.jsonl (the router/... metrics of docs CONTRACT.md), as PNGs:

router_change_rate.png   per-layer x step heat map of router/layer{i}/change_rate
router_variance.png      Var(l), Var(l_route), Var(l_weight), 2 Cov and the router share over steps
router_load.png          expert load per layer over steps (load_cv, load_max_mean) and router entropy
router_var_changed.png   Var(l) among routing-changed vs unchanged tokens, per layer, over steps

  python tools/plot_router_diagnostics.py RUN_DIR [--out DIR]     (default DIR: RUN_DIR/plots)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

LAYER_KEY = re.compile(r"^router/layer(\d+)/(\w+)$")


def read_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                if not row.get("skipped") and "step" in row and any(k.startswith("router/") for k in row):
                    rows.append(row)
    return rows


def layer_series(rows: list[dict], name: str) -> tuple[list[int], dict[int, list[float]]]:
    """steps, {layer: values per step (nan where missing)} for router/layer{i}/<name>."""
    steps = [r["step"] for r in rows]
    layers = sorted({int(m.group(1)) for r in rows for k in r if (m := LAYER_KEY.match(k)) and m.group(2) == name})
    return steps, {i: [float(r.get(f"router/layer{i}/{name}", float("nan"))) for r in rows] for i in layers}


def plot(run_dir: str, out_dir: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        return []
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    steps, change = layer_series(rows, "change_rate")
    if change:
        grid = np.array([change[i] for i in sorted(change)])
        fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(steps) + 3), max(2.5, 0.3 * len(change) + 1.5)))
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        ax.set_yticks(range(len(change)), [str(i) for i in sorted(change)], fontsize=7)
        ax.set(xlabel="step", ylabel="MoE layer", title="routing change rate (old vs current top-k set)")
        fig.colorbar(im, ax=ax)
        save(fig, "router_change_rate.png")

    keys = ["router/var_logratio", "router/var_route", "router/var_weight", "router/cov_route_weight"]
    if any(k in r for r in rows for k in keys):
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
        save(fig, "router_variance.png")

    panels = [(n, layer_series(rows, n)[1]) for n in ("load_cv", "load_max_mean", "entropy")]
    panels = [(n, s) for n, s in panels if s]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
        for ax, (name, series) in zip(axes[0], panels):
            for layer, values in series.items():
                ax.plot(steps, values, marker="o", ms=3, label=f"layer {layer}")
            ax.set(xlabel="step", title=f"expert load: {name}" if name != "entropy" else "router entropy")
            ax.legend(fontsize=6)
        save(fig, "router_load.png")

    _, changed = layer_series(rows, "var_changed")
    _, unchanged = layer_series(rows, "var_unchanged")
    if changed and unchanged:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, layer in enumerate(sorted(changed)):
            ax.plot(steps, changed[layer], marker="o", ms=3, color=f"C{i % 10}", label=f"layer {layer} changed")
            ax.plot(steps, unchanged.get(layer, [float("nan")] * len(steps)), ls="--", color=f"C{i % 10}")
        ax.set(xlabel="step", title="Var(l): routing changed (solid) vs unchanged (dashed)")
        ax.legend(fontsize=6)
        save(fig, "router_var_changed.png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    written = plot(args.run_dir, args.out)
    if not written:
        print(f"no router/... metrics in {args.run_dir}/metrics.jsonl (diagnostics.router_every > 0?)")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
