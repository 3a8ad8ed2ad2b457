"""tools/plot_router_diagnostics.py writes its PNGs from a recorded (synthetic) metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
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


def test_plot_tool_writes_router_pngs(tmp_path):
    tool = _tool()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    steps, change = tool.layer_series(tool.read_rows(str(tmp_path / "metrics.jsonl")), "change_rate")
    assert steps == [2, 4, 6] and sorted(change) == [0, 1, 2]
    assert change[2] == pytest.approx([0.22, 0.24, 0.26])
    assert tool.main([str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["router_change_rate.png", "router_load.png", "router_var_changed.png", "router_variance.png"]
    for path in (tmp_path / "plots").iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_plot_tool_without_router_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.0}) + "\n")
    assert _tool().main([str(tmp_path)]) == 1
