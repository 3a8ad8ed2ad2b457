"""The trainer end to end with a real SGLang server it launches: at two ranks (torchrun relaunch) the server
must not inherit the trainer's torch.distributed world, rank 0 alone gathers and syncs the weights, and every
step's post-sync check holds; async rollouts; r3 replay of the routed experts the server reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.sglang.conftest import REPO


def _train(cmd: list[str], tmp_path, run) -> list[dict]:
    """Run the trainer command (its own session, killed as a group if it hangs); its metrics rows."""
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=480)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"the run hung; log tail:\n{log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def test_two_rank_trainer_with_a_launched_server(tmp_path, kit_python):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", "examples/tiny_moe_cpu.yaml",
           "parallel.dp=2", "train.micro_batch_size=4", "train.steps=2", f"run.dir={run}", "logging.plots=false",
           "rollout.engine=sglang", f"rollout.sglang.python={kit_python}", "rollout.sglang.base_port=31400",
           "rollout.sglang.max_total_tokens=4096", "rollout.max_new_tokens=6",
           "diagnostics.router_every=2"]  # fmt: skip
    rows = _train(cmd, tmp_path, run)
    assert [r["step"] for r in rows] == [1, 2] and [r["weight_version"] for r in rows] == [1, 2]
    for r in rows:  # the served weights after each sync are the trainer's
        assert r["sync/logprob_abs_diff_max"] < 1e-3 and r["kl_rollout_k3"] < 1e-4
    # no replay: pi_old routes freely; on the synced weights the server's experts (reported per token) are the
    # trainer's own choice up to float near-ties (random top-2 sets of 4 experts would differ ~5 times in 6)
    assert all(0.0 <= rows[1][f"router/layer{i}/rollout_change_rate"] < 0.1 for i in (0, 1))


def test_async_rollouts_with_a_launched_server(tmp_path, kit_python):
    """rollout.async_steps=1 with a real server: the rollout ahead runs in the trainer's thread pool while it
    trains (HTTP from that thread), each sync waits for it, and the served weights after every sync are the
    trainer's; the samples trained on at steps 2.. come from the weights one version back."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", "examples/tiny_moe_cpu.yaml", "rollout.async_steps=1",
           "train.steps=3", f"run.dir={run}", "logging.plots=false", "rollout.engine=sglang",
           f"rollout.sglang.python={kit_python}", "rollout.sglang.base_port=31500",
           "rollout.sglang.max_total_tokens=4096", "rollout.max_new_tokens=6"]  # fmt: skip
    rows = _train(cmd, tmp_path, run)
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert [r["rollout_staleness"] for r in rows] == [0, 1, 1]
    assert all(r["sync/logprob_abs_diff_max"] < 1e-3 for r in rows)
    assert rows[0]["kl_rollout_k3"] < 1e-4  # step 1 is on-policy; later steps see one update of lag


def test_r3_replays_the_servers_routing(tmp_path, kit_python, monkeypatch):
    """algo.routing_replay=r3 end to end on a real server (in this process, so the engine can be watched):
    pi_old's pass and every update run on exactly the experts the server reported for each token, and the
    server's routing agrees with the trainer's free routing on the synced weights."""
    import torch

    from megatron_sapo.config import load_config
    from megatron_sapo.megatron.engine import MegatronEngine
    from megatron_sapo.trainer import Trainer, train

    recorded, original = [], MegatronEngine.compute_log_probs
    served, original_rollout = [], Trainer.rollout_step

    def spy(self, batch, with_entropy=False, record_routing=False):
        out = original(self, batch, with_entropy, record_routing)
        if record_routing:  # (the routing it was told to replay, the routing it used, the loss mask)
            recorded.append((batch.get("replay_routing"), out[-1], batch["loss_mask"]))
        return out

    def rollout_spy(self, *args):  # the experts the server reported for each step's samples, as returned
        samples, metrics = original_rollout(self, *args)
        served.append([s.routed_experts.clone() for s in samples])
        return samples, metrics

    monkeypatch.setattr(MegatronEngine, "compute_log_probs", spy)
    monkeypatch.setattr(Trainer, "rollout_step", rollout_spy)
    cfg = load_config(os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"), [
        "algo.routing_replay=r3", "diagnostics.router_every=1", "diagnostics.max_sequences=16", "train.steps=2",
        f"run.dir={tmp_path / 'run'}", "logging.plots=false", "rollout.engine=sglang", "rollout.max_new_tokens=6",
        f"rollout.sglang.python={kit_python}", "rollout.sglang.base_port=31600", "rollout.sglang.max_total_tokens=4096",
    ])  # fmt: skip
    history = train(cfg)
    assert [m["weight_version"] for m in history] == [1, 2] and len(served) == 2
    replays = [r for r in recorded if r[0] is not None]
    for forced, used, mask in replays:  # every replayed pass ran on exactly the routing it was given
        sel = mask > 0
        assert torch.equal(used["ids"][sel].long(), forced[sel].long())
    old_passes = [forced for forced, _, mask in replays if mask.shape[0] == 32]  # pi_old's: the whole step
    assert len(old_passes) == 2
    for forced, step_samples in zip(old_passes, served):  # ... and that routing is the server's, token by token
        for row, experts in enumerate(step_samples):
            assert torch.equal(forced[row, : len(experts)].long(), experts.long())
    for m in history:
        assert all(m[f"router/minibatch{k}/train_change_rate"] == 0.0 for k in range(4))  # updates replay too
        assert m["router/var_route"] == 0.0
        assert all(0.0 <= m[f"router/layer{i}/rollout_change_rate"] < 0.1 for i in (0, 1))
        assert m["sync/logprob_abs_diff_max"] < 1e-3 and m["kl_rollout_k3"] < 1e-4
