"""Routing replay and router diagnostics inside the RL loop (in-process, world size 1, real engines). r3 replays
the routing an SGLang server reports: tests/sglang/test_trainer_sglang.py runs it against a real server."""

import json

from megatron_sapo.config import load_config


def _run(tmp_path, name, *overrides, edit=None):
    from megatron_sapo.trainer import train

    rows = [{"prompt": f"copy:{i}{i}{i}=", "answer": f"{i}{i}{i}", "task": "copy"} for i in range(8)]
    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        "examples/tiny_moe_cpu.yaml",
        [f"data.paths=[{data}]", f"run.dir={tmp_path / name}", "rollout.max_new_tokens=4", "checkpoint.resume=none",
         "train.steps=2", "optim.lr=3e-2", "diagnostics.max_sequences=16", *overrides],
    )  # fmt: skip
    if edit is not None:
        edit(cfg)
    return train(cfg)


def _layers(m):
    return sorted(k for k in m if k.startswith("router/layer") and k.endswith("/change_rate"))


def test_free_routing_run_reports_router_metrics_at_cadence(tmp_path):
    history = _run(tmp_path, "free", "diagnostics.router_every=2")
    assert not any(k.startswith("router/") for k in history[0])  # step 1: not due
    m = history[1]
    assert _layers(m) == ["router/layer0/change_rate", "router/layer1/change_rate"]
    parts = m["router/var_route"] + m["router/var_weight"] + 2 * m["router/cov_route_weight"]
    assert abs(parts - m["router/var_logratio"]) <= 1e-9 * max(1.0, m["router/var_logratio"])
    assert m["router/var_logratio"] > 0 and m["router/var_route"] > 0  # 4 updates moved the routing
    assert max(m[k] for k in _layers(m)) > 0
    assert m["router/share"] >= 0
    # the router metrics reached the metrics stream
    written = [json.loads(x) for x in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines() if x]
    assert any("router/var_logratio" in r for r in written)
    plots = {p.name for p in (tmp_path / "free" / "plots").iterdir()}  # the run drew its router figures too
    assert {"router_change_rate.png", "router_variance.png", "router_load.png", "reward.png"} <= plots
    # per mini-batch index (4 updates): update 0 is on-policy, later ones see the drift of earlier steps
    assert "router/minibatch0/var_logratio" not in m and m["router/minibatch0/train_change_rate"] == 0.0
    # (the big learning rate nearly collapses the router by this step: not every update moves the routing)
    assert all(m[f"router/minibatch{k}/var_logratio"] > 0 for k in (1, 2, 3))
    assert max(m[f"router/minibatch{k}/var_route"] for k in (1, 2, 3)) > 0
    assert max(m[f"router/minibatch{k}/train_change_rate"] for k in (1, 2, 3)) > 0
    assert max(m[f"router/layer{i}/train_change_rate"] for i in (0, 1)) > 0


def test_r2_run_replays_routing_in_every_update(tmp_path):
    history = _run(tmp_path, "r2", "algo.routing_replay=r2", "diagnostics.router_every=1")
    for m in history:
        assert m["router/var_route"] == 0.0 and m["router/share"] == 0.0
        assert all(m[k] == 0.0 for k in _layers(m)) and len(_layers(m)) == 2
        assert m["router/var_logratio"] > 0  # the weights did change
        for k in range(4):  # every update's training forward replayed pi_old's routing
            assert m[f"router/minibatch{k}/train_change_rate"] == 0.0
            assert k == 0 or m[f"router/minibatch{k}/var_route"] == 0.0
        assert m["router/minibatch3/var_logratio"] > 0


def test_diagnose_command_between_two_checkpoints(tmp_path, capsys):
    from megatron_sapo.cli import main

    _run(tmp_path, "ck", "checkpoint.every=1", "checkpoint.keep=5")
    ckpts = tmp_path / "ck" / "checkpoints"
    common = ["diagnose", "examples/tiny_moe_cpu.yaml", "diagnostics.max_sequences=8", "--old", str(ckpts / "step_1")]
    out = tmp_path / "diag.json"
    assert main([*common, "--new", str(ckpts / "step_2"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "var_route" in printed and "change_rate" in printed
    m = json.loads(out.read_text())
    parts = m["router/var_route"] + m["router/var_weight"] + 2 * m["router/cov_route_weight"]
    assert m["router/var_logratio"] > 0 and abs(parts - m["router/var_logratio"]) < 1e-9
    assert max(m["router/layer0/change_rate"], m["router/layer1/change_rate"]) > 0
    same = tmp_path / "same.json"
    assert main([*common, "--out", str(same)]) == 0  # pi_theta = pi_old: nothing moved
    m = json.loads(same.read_text())
    assert m["router/var_logratio"] == 0.0 and m["router/layer0/change_rate"] == 0.0
