"""The router figures (diagnostics/router_plots.py) from a recorded (synthetic) metrics.jsonl: drawn by the
end-of-run plot_run and by tools/plot_router_diagnostics.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_router_diagnostics.py"


def _tool():
    spec = importlib.util.spec_from_file_location("plot_router_diagnostics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    rows = []
    for step in range(1, 7):
        row = {"step": step, "loss": -0.1}
        if step % 2 == 0:  # router_every = 2
            row.update({"router/var_logratio": 0.01 * step, "router/var_route": 0.004 * step,
                        "router/var_weight": 0.005 * step, "router/cov_route_weight": 0.001 * step,
                        "router/share": 0.4})  # fmt: skip
            for layer in range(3):
                for name, value in (("change_rate", 0.1 * layer + 0.01 * step), ("var_changed", 0.02),
                                    ("var_unchanged", 0.01), ("load_cv", 0.3), ("load_max_mean", 1.5),
                                    ("entropy", 1.2)):  # fmt: skip
                    row[f"router/layer{layer}/{name}"] = value
        rows.append(row)
    rows.append({"step": 7, "skipped": 1.0})
    return rows


ROUTER_PNGS = ["router_change_rate.png", "router_load.png", "router_var_changed.png", "router_variance.png"]


def test_plot_tool_writes_router_pngs(tmp_path):
    from megatron_sapo.diagnostics.router_plots import layer_series, router_rows

    rows = _rows()
    rows[1]["router/layer0/change_rate"] = None  # a NaN is logged as null: drawn as a gap
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, change = layer_series(router_rows(str(tmp_path)), "change_rate")
    assert steps == [2, 4, 6] and sorted(change) == [0, 1, 2]
    assert change[2] == pytest.approx([0.22, 0.24, 0.26])
    assert math.isnan(change[0][0])
    assert _tool().main([str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ROUTER_PNGS
    for path in (tmp_path / "plots").iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_end_of_run_plots_include_the_router_figures(tmp_path):
    """CONTRACT: plots/*.png holds training curves and router figures; plot_run (the end of a run) draws both."""
    from megatron_sapo.diagnostics.plots import plot_run

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    names = {os.path.basename(p) for p in plot_run(str(tmp_path))}
    assert set(ROUTER_PNGS) <= names and "loss_and_grad.png" in names and "router_share.png" in names
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.0}) + "\n")
    written = plot_run(str(tmp_path), str(tmp_path / "p2"))
    assert written and not any(os.path.basename(p).startswith("router_") for p in written)


def test_plot_tool_without_router_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.0}) + "\n")
    assert _tool().main([str(tmp_path)]) == 1
