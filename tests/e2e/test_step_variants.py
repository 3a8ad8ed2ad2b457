"""Ways of running a step that must not change what it computes: pi_old from the rollout engine
(algo.old_logprobs=rollout) and the local engine in its own process (rollout.local_process)."""

import math

from megatron_sapo.config import load_config
from megatron_sapo.megatron.engine import MegatronEngine


def _run(tmp_path, monkeypatch, name, *overrides):
    """A 3-step tiny run; returns its metrics rows and the shapes of the batches pi_old passes ran on."""
    from megatron_sapo.trainer import train

    calls = []
    original = MegatronEngine.compute_log_probs

    def counted(self, batch, *args, **kwargs):
        calls.append(batch["tokens"].shape)
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(MegatronEngine, "compute_log_probs", counted)
    cfg = load_config(
        "examples/tiny_moe_cpu.yaml",
        [f"run.dir={tmp_path / name}", "train.steps=3", "rollout.max_new_tokens=4", "checkpoint.resume=none",
         "model.dtype=fp32", "logging.plots=false", *overrides],
    )  # fmt: skip
    return train(cfg), calls


def test_rollout_log_probs_as_pi_old_skip_the_pass_and_train_alike(tmp_path, monkeypatch):
    recomputed, recompute_calls = _run(tmp_path, monkeypatch, "recompute", "algo.old_logprobs=recompute")
    reused, reuse_calls = _run(tmp_path, monkeypatch, "rollout", "algo.old_logprobs=rollout")
    assert len(recompute_calls) == 3 and reuse_calls == []  # one pi_old pass per step, or none
    for a, b in zip(recomputed, reused, strict=True):
        assert a["kl_rollout_k3"] < 1e-9  # the local engine samples from the trainer's own weights
        assert math.isnan(b["kl_rollout_k3"])  # not measured: pi_old is pi_rollout by construction
        # the same samples (same seeds, weights equal up to float rounding), so the same rewards and losses
        assert a["reward_mean"] == b["reward_mean"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(a["ratio_mean"], b["ratio_mean"], rel_tol=1e-5)
        assert math.isfinite(b["grad_norm"]) and b["grad_norm"] > 0


def test_the_local_engine_in_its_own_process_trains_bitwise_alike(tmp_path, monkeypatch):
    """Async rollouts (the case the child process is for) from a thread and from the child: the same samples
    on the same weights, so the same metrics to the last bit."""
    threaded, _ = _run(tmp_path, monkeypatch, "thread", "rollout.async_steps=1")
    child, _ = _run(tmp_path, monkeypatch, "child", "rollout.async_steps=1", "rollout.local_process=true")
    assert [r["rollout_staleness"] for r in child] == [0, 1, 1]  # steps 2 and 3 were generated ahead
    keys = ("reward_mean", "response_len_mean", "loss", "grad_norm", "ratio_mean", "ratio_std", "kl_rollout_k3")
    for a, b in zip(threaded, child, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
