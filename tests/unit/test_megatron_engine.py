"""MegatronEngine at world size 1 (one process, real megatron-core): batch plumbing, log-probs against a
plain forward, temperature, LR schedules, global weights round trip, layout checks."""

from __future__ import annotations

import math
import queue

import pytest
import torch

from megatron_sapo.config import Config, ModelConfig, OptimConfig, ParallelConfig
from megatron_sapo.megatron import loss_glue, model
from tests.batches import right_padded_batch


def _config() -> Config:
    cfg = Config()
    cfg.model.num_layers, cfg.model.num_experts, cfg.model.moe_shared_expert_ffn_hidden_size = 2, 4, 32
    cfg.train.micro_batch_size = 2
    cfg.optim.lr = 1e-3
    cfg.model.dtype = "fp32"  # exact comparisons, also on a GPU (where "auto" is bf16)
    return cfg


def _batch(n=4, s=20, vocab=512, seed=0) -> dict:
    return right_padded_batch(n, s, vocab, seed, response=4)


@pytest.fixture(scope="module")
def engine():
    from megatron_sapo.megatron.engine import MegatronEngine

    eng = MegatronEngine(_config())
    yield eng
    eng.shutdown()


def _plain_logits(eng, tokens: torch.Tensor) -> torch.Tensor:
    """The wrapped GPTModel's own forward on the model's device (CPU or GPU), logits back on the CPU."""
    device = next(eng.model[0].parameters()).device
    tokens = tokens.to(device)
    with torch.no_grad():
        return eng.model[0](tokens, torch.arange(tokens.shape[1], device=device).expand_as(tokens), None).cpu()


def _plain_log_probs(eng, batch, temperature=1.0):
    logits = _plain_logits(eng, batch["tokens"][:, :-1])
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, batch["tokens"][:, 1:, None]).squeeze(-1)


def test_compute_log_probs_matches_plain_forward(engine):
    batch = _batch()
    lp = engine.compute_log_probs(batch)
    assert lp.shape == (4, 19)
    ref = _plain_log_probs(engine, batch)
    covered = batch["loss_mask"].sum(0) > 0
    last = int(torch.nonzero(covered).max()) + 1
    torch.testing.assert_close(lp[:, :last], ref[:, :last], rtol=1e-5, atol=1e-5)
    assert torch.all(lp[:, last:] == 0)  # beyond the last loss token: not computed


def test_entropy_from_the_forward_only_pass(engine):
    batch = _batch(seed=3)
    lp, entropy = engine.compute_log_probs(batch, with_entropy=True)
    logits = _plain_logits(engine, batch["tokens"][:, :-1]).float()
    ref = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    mask = batch["loss_mask"] > 0
    torch.testing.assert_close(entropy[mask], ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp, engine.compute_log_probs(batch))


def test_temperature_divides_logits(engine):
    batch = _batch(seed=1)
    engine.loss_spec.temperature = 0.5
    try:
        lp = engine.compute_log_probs(batch)
    finally:
        engine.loss_spec.temperature = 1.0
    mask = batch["loss_mask"] > 0
    ref = _plain_log_probs(engine, batch, temperature=0.5)
    torch.testing.assert_close(lp[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_train_minibatch_reports_metrics_and_moves_loss(engine):
    batch = _batch(seed=2)
    batch["old_log_probs"] = engine.compute_log_probs(batch)
    batch["rollout_log_probs"] = batch["old_log_probs"] + 0.01 * batch["loss_mask"]
    first = engine.train_minibatch(batch)
    for key in ("loss", "grad_norm", "lr", "ratio_mean", "ratio_std", "gate_mean", "kl_rollout_k3"):
        assert math.isfinite(first[key]), key
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy first step
    assert first["n_tokens"] == float(batch["loss_mask"].sum())
    second = engine.train_minibatch(batch)
    assert second["loss"] < first["loss"]
    assert second["ratio_std"] > 0


def test_batch_must_split_into_microbatches(engine):
    batch = _batch(n=3)
    batch["advantages"] = torch.ones(3)
    batch["old_log_probs"] = torch.zeros(3, 19)
    with pytest.raises(ValueError, match="micro-batches of 2"):
        engine.forward_backward(batch)


def test_forward_only_micro_batch_size(engine):
    """train.logprob_micro_batch_size sets the forward-only passes' micro-batches (capped at the largest
    divisor of the batch); the log-probs don't depend on it."""
    batch = _batch(n=6, seed=5)
    t = engine.cfg.train
    assert engine._forward_only_micro_batch_size(6) == 2  # 0: train.micro_batch_size
    ref = engine.compute_log_probs(batch)
    try:
        for size, used in ((6, 6), (4, 3), (64, 6)):
            t.logprob_micro_batch_size = size
            assert engine._forward_only_micro_batch_size(6) == used
            torch.testing.assert_close(engine.compute_log_probs(batch), ref, rtol=1e-5, atol=1e-6)
    finally:
        t.logprob_micro_batch_size = 0
    assert engine.compute_log_probs(_batch(n=3)).shape == (3, 19)  # 3 rows: micro-batches of 1


def test_global_state_dict_round_trip(engine):
    full = engine.global_state_dict()
    assert "output_layer.weight" in full and full["output_layer.weight"].shape == (512, 64)
    # rounded to the parameters' dtype (bf16 on GPU), so the round trip is exact there too
    perturbed = {k: (v + 1.0).to(engine.tcfg.params_dtype).float() for k, v in full.items()}
    engine.load_global_state_dict(perturbed)
    again = engine.global_state_dict()
    assert all(torch.equal(again[k], perturbed[k]) for k in full)
    engine.load_global_state_dict(full)


def test_microbatch_split_pads_and_trims():
    batch = _batch(n=4, s=20)
    length = loss_glue.padded_length(batch["loss_mask"], multiple=4)
    assert length % 4 == 0 and length >= int(torch.nonzero(batch["loss_mask"].sum(0)).max()) + 1
    mbs = loss_glue.make_microbatches({**batch, "old_log_probs": torch.zeros(4, 19)}, 2, length)
    assert len(mbs) == 2 and mbs[0]["tokens"].shape == (2, length)
    assert torch.equal(mbs[1]["labels"][:, :5], batch["tokens"][2:, 1:6])
    assert loss_glue.global_denominators(batch["loss_mask"]) == (4.0, float(batch["loss_mask"].sum()))


def test_metric_reduction_is_token_weighted():
    sums = [
        {"n_tokens": ("sum", torch.tensor(1.0)), "gate_mean": ("sum", torch.tensor(0.5)),
         "ratio_max": ("max", torch.tensor(2.0)), "loss": ("sum", torch.tensor(1.0)),
         "ratio_sum": ("sum", torch.tensor(1.0)), "ratio_sq_sum": ("sum", torch.tensor(1.0))},
        {"n_tokens": ("sum", torch.tensor(3.0)), "gate_mean": ("sum", torch.tensor(3.0)),
         "ratio_max": ("max", torch.tensor(1.5)), "loss": ("sum", torch.tensor(2.0)),
         "ratio_sum": ("sum", torch.tensor(5.0)), "ratio_sq_sum": ("sum", torch.tensor(9.0))},
    ]  # fmt: skip
    out = loss_glue.reduce_metrics(sums, None, None, 0, True)
    assert out["gate_mean"] == pytest.approx(3.5 / 4) and out["ratio_max"] == 2.0 and out["loss"] == 3.0
    assert out["ratio_mean"] == pytest.approx(1.5) and out["ratio_std"] == pytest.approx(math.sqrt(10 / 4 - 2.25))


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
def test_lr_schedule(engine, decay):
    from megatron_sapo.megatron.optimizer import build_optimizer, build_scheduler, current_lr

    ocfg = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_steps=2, lr_decay=decay)
    # megatron's scheduler reads max_lr / min_lr from the param groups, i.e. from the optimizer's config
    opt = build_optimizer(ocfg, engine.model, torch.float32)
    scheduler = build_scheduler(ocfg, opt, total_steps=10)
    lrs = []
    for _ in range(10):
        scheduler.step(1)
        lrs.append(current_lr(opt))
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # warmup
    if decay == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    if decay == "cosine":
        assert lrs[3] > 0.1 + 0.9 * 0.75  # a quarter into the decay, cosine is above the linear ramp


def test_moe_layout_check_rejects_silently_wrong_expert_grads():
    m = ModelConfig()
    with pytest.raises(ValueError, match="parallel.etp"):
        model.check_moe_layout(m, ParallelConfig(tp=2, sp=True, etp=1, ep=1))
    model.check_moe_layout(m, ParallelConfig(tp=2, sp=True, etp=2, ep=1))
    model.check_moe_layout(m, ParallelConfig(tp=2, sp=True, etp=1, ep=2, dp=2))


def test_training_forward_record_holds_its_log_probs(engine):
    """forward_backward(record_routing=True) hands back the training forward's own log-probs: those of a
    forward-only pass at the same weights (the router diagnostics reuse them instead of another pass)."""
    batch = _batch(seed=7)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    batch["old_log_probs"] = engine.compute_log_probs(batch)
    _, record = engine.forward_backward(batch, record_routing=True)
    mask = batch["loss_mask"].bool()
    torch.testing.assert_close(record["log_probs"][mask], batch["old_log_probs"][mask], rtol=1e-5, atol=1e-6)
    assert record["ids"].shape[:2] == batch["loss_mask"].shape and record["log_probs"].shape == mask.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only: megatron uses TE/Apex fused Adam on GPU")
def test_cpu_adam_is_fused_and_stays_fused_after_a_checkpoint_load(engine, tmp_path):
    def flags():
        groups = [g for o in engine.optimizer.chained_optimizers for g in o.optimizer.param_groups]
        return {(g["fused"], g["foreach"]) for g in groups}

    assert flags() == {(True, False)}
    batch = _batch(seed=11)  # one update first: Adam's state exists only after a step (the test stands alone)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    batch["old_log_probs"] = engine.compute_log_probs(batch)
    engine.train_minibatch(batch)
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    children = set(psutil.Process().children(recursive=True))
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    # the write's results came back through a plain queue: no Manager server process was left behind
    # (megatron's own would be a new live child of this process, and an orphan after a SIGKILL)
    assert isinstance(filesystem_async._results_queue, queue.Queue)
    assert set(psutil.Process().children(recursive=True)) - children == set()
    for o in engine.optimizer.chained_optimizers:  # as a checkpoint from before fused Adam would restore them
        for g in o.optimizer.param_groups:
            g["fused"], g["foreach"] = None, None
    engine.load_checkpoint(str(tmp_path / "ckpt"))
    assert flags() == {(True, False)}


def test_bf16_model_holds_every_weight_in_bf16(engine):
    # The local spec's torch norms are built in fp32 whatever params_dtype says; a bf16 model must hold bf16
    # weights only (megatron's bf16 optimizer cannot checkpoint a model with fp32 params: found on an H100).
    import dataclasses

    mcfg = dataclasses.replace(engine.cfg.model, dtype="bf16")
    tcfg = model.build_transformer_config(mcfg, engine.cfg.parallel)
    chunks = model.build_model_chunks(mcfg, tcfg, engine.cfg.parallel)
    dtypes = {n: p.dtype for c in chunks for n, p in c.named_parameters()}
    assert any("layernorm" in n for n in dtypes)
    assert {n for n, d in dtypes.items() if d != torch.bfloat16} == set()
