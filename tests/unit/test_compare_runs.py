"""tools/compare_runs.py: per-run first/last-window means and one PNG per metric, from run folders."""

from __future__ import annotations

import importlib.util
import os

from megatron_sapo.diagnostics.compare import load_runs, summary
from megatron_sapo.diagnostics.writer import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    spec = importlib.util.spec_from_file_location("compare_runs", os.path.join(ROOT, "tools", "compare_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder, rewards, router_share=None):
    os.makedirs(folder)
    writer = MetricsWriter(str(folder))
    for step, reward in enumerate(rewards, start=1):
        row = {"step": step, "reward_mean": reward, "loss": -reward}
        if router_share is not None:
            row["router/share"] = router_share
        writer.write(row)
    writer.close()
    return str(folder)


def test_table_and_plots(tmp_path, capsys):
    sapo = _run(tmp_path / "sapo", [0.1, 0.2, 0.3, 0.5, 0.6, 0.7], router_share=0.25)
    grpo = _run(tmp_path / "grpo", [0.1, 0.1, float("nan"), 0.2, 0.3])  # a NaN reward is a missing value
    runs = load_runs([sapo, grpo])
    rows = {(r["run"], r["metric"]): r for r in summary(runs, ["reward_mean", "router/share"], window=2)}
    assert rows[("sapo", "reward_mean")]["first"] == (0.1 + 0.2) / 2
    assert rows[("sapo", "reward_mean")]["last"] == (0.6 + 0.7) / 2
    assert rows[("grpo", "reward_mean")]["steps"] == 4 and rows[("grpo", "reward_mean")]["last"] == (0.2 + 0.3) / 2
    assert ("grpo", "router/share") not in rows and rows[("sapo", "router/share")]["final"] == 0.25

    out = tmp_path / "plots"
    argv = [sapo, grpo, "--labels", "SAPO,GRPO", "--window", "2", "--out", str(out)]
    assert _tool().main([*argv, "--keys", "reward_mean,router/shar"]) == 2  # a typo names itself and the choices
    err = capsys.readouterr().err
    assert "--keys router/shar: in none of the runs" in err and "router/share" in err and not out.exists()
    assert _tool().main([*argv, "--keys", "reward_mean,router/share"]) == 0  # only SAPO has router/share
    printed = capsys.readouterr().out
    assert "SAPO" in printed and "GRPO" in printed
    assert sorted(os.listdir(out)) == ["compare_reward_mean.png", "compare_router_share.png"]
    assert all(os.path.getsize(out / name) > 1000 for name in os.listdir(out))


def test_a_folder_without_metrics_is_one_clear_error(tmp_path, capsys):
    good = _run(tmp_path / "good", [0.1, 0.2])
    assert _tool().main([good, str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing: no metrics.jsonl" in capsys.readouterr().err
    assert _tool().main([good, "--labels", "a,b"]) == 2
