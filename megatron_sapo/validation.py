"""Config validation: every rule a layout or value must meet, checked with integer arithmetic on the config
alone, before any process starts. Each failure is a ConfigError naming the key and the rule."""

from __future__ import annotations

import importlib.util

from megatron_sapo.config import (
    AlgoConfig,
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RolloutConfig,
    SGLangConfig,
)


def _require(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {rule}")


def _validate_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    for name in ("tp", "pp", "ep", "etp", "cp", "dp"):
        _require(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    _require(
        m.num_attention_heads % p.tp == 0,
        "parallel.tp",
        f"model.num_attention_heads={m.num_attention_heads} must be divisible by tp={p.tp}",
    )
    groups = m.num_query_groups or m.num_attention_heads
    _require(groups % p.tp == 0, "parallel.tp", f"model.num_query_groups={groups} must be divisible by tp={p.tp}")
    _require(
        m.vocab_size % p.tp == 0,
        "parallel.tp",
        f"model.vocab_size={m.vocab_size} must be divisible by tp={p.tp}",
    )
    chunks = p.pp * (p.vpp or 1)
    _require(
        m.num_layers % chunks == 0,
        "parallel.pp",
        f"model.num_layers={m.num_layers} must be divisible by pp*vpp={chunks}",
    )
    _require(p.cpu_threads >= 0, "parallel.cpu_threads", f"must be >= 0 (0 = automatic), got {p.cpu_threads}")
    if p.vpp is not None:
        _require(p.vpp >= 1, "parallel.vpp", f"must be >= 1, got {p.vpp}")
        _require(p.pp > 1, "parallel.vpp", "virtual pipeline needs pp > 1")
    if m.is_moe:
        _require(
            m.num_experts % p.ep == 0,
            "parallel.ep",
            f"model.num_experts={m.num_experts} must be divisible by ep={p.ep}",
        )
        dense_ranks = p.tp * p.cp * p.dp  # ranks of one pipeline stage
        _require(
            dense_ranks % (p.ep * p.etp) == 0,
            "parallel.ep",
            f"tp*cp*dp={dense_ranks} must be divisible by ep*etp={p.ep * p.etp}",
        )
        # megatron-core 0.16.1 never sums expert gradients over TP when ep == 1 and etp < tp (measured:
        # 0.8 relative gradient error at tp=2, etp=1, ep=1); refuse the layout rather than train wrongly.
        _require(
            p.ep > 1 or p.etp == p.tp,
            "parallel.etp",
            f"with parallel.ep=1 the experts must be split like the dense layers: set parallel.etp={p.tp} "
            f"(got etp={p.etp} with tp={p.tp}), or use parallel.ep > 1",
        )
        _require(
            p.tp == 1 or p.sp,
            "parallel.sp",
            f"MoE layers with tp={p.tp} need sequence parallel: set parallel.sp=true",
        )
    else:
        _require(p.ep == 1, "parallel.ep", "expert parallelism needs an MoE model (model.num_experts > 0)")
    _require(not p.sp or p.tp > 1, "parallel.sp", "sequence parallel needs tp > 1")
    _validate_recompute(m, p)


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "moe_act", "shared_experts")


def _validate_recompute(m: ModelConfig, p: ParallelConfig) -> None:
    if m.recompute_granularity == "selective":
        bad = sorted(set(m.recompute_modules) - set(RECOMPUTE_MODULES))
        _require(not bad, "model.recompute_modules", f"{bad} not in {list(RECOMPUTE_MODULES)}")
        _require(bool(m.recompute_modules), "model.recompute_modules", "selective recompute needs a module")
    if m.recompute_granularity != "full":
        return
    per_stage = m.num_layers // (p.pp * (p.vpp or 1))
    n = m.recompute_num_layers
    _require(1 <= n <= per_stage, "model.recompute_num_layers", f"must be in [1, {per_stage}] (layers per stage)")
    # megatron's uniform method checkpoints units of n layers and would run past the stage's last layer
    _require(
        m.recompute_method == "block" or per_stage % n == 0,
        "model.recompute_num_layers",
        f"with recompute_method=uniform it must divide the {per_stage} layers per pipeline stage, got {n}",
    )


def _validate_model(m: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_seq_len"):
        _require(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    _require(
        m.hidden_size % m.num_attention_heads == 0 or m.kv_channels is not None,
        "model.hidden_size",
        f"hidden_size={m.hidden_size} must be divisible by num_attention_heads={m.num_attention_heads} "
        "(or set model.kv_channels)",
    )
    if m.num_query_groups is not None:
        _require(
            m.num_attention_heads % m.num_query_groups == 0,
            "model.num_query_groups",
            f"num_attention_heads={m.num_attention_heads} must be divisible by it ({m.num_query_groups})",
        )
    _require(m.num_experts >= 0, "model.num_experts", "must be >= 0 (0 = dense)")
    if m.is_moe:
        _require(
            1 <= m.moe_topk <= m.num_experts,
            "model.moe_topk",
            f"must be in [1, num_experts={m.num_experts}], got {m.moe_topk}",
        )


def _validate_algo(a: AlgoConfig, m: ModelConfig, r: RolloutConfig) -> None:
    from megatron_sapo.algo import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES

    for key, registry, value in (
        ("algo.loss", POLICY_LOSSES, a.loss),
        ("algo.agg", AGGREGATIONS, a.agg),
        ("algo.advantage", ADVANTAGES, a.advantage),
    ):
        _require(value in registry, key, f"{value!r} is not one of {registry.names()}")
    _require(a.tau_pos > 0, "algo.tau_pos", f"must be > 0, got {a.tau_pos}")
    _require(a.tau_neg > 0, "algo.tau_neg", f"must be > 0, got {a.tau_neg}")
    _require(a.eps_low is None or 0 <= a.eps_low < 1, "algo.eps_low", f"must be in [0, 1), got {a.eps_low}")
    _require(a.eps_high is None or a.eps_high >= 0, "algo.eps_high", f"must be >= 0, got {a.eps_high}")
    _require(a.kl_coef >= 0, "algo.kl_coef", f"must be >= 0, got {a.kl_coef}")
    _require(a.entropy_coef >= 0, "algo.entropy_coef", f"must be >= 0, got {a.entropy_coef}")
    _require(a.minibatches >= 1, "algo.minibatches", f"must be >= 1, got {a.minibatches}")
    _require(a.tis_cap >= 0, "algo.tis_cap", f"must be >= 0 (0 = off), got {a.tis_cap}")
    if a.old_logprobs == "rollout":  # nothing to replay or correct without pi_old's own pass
        _require(a.routing_replay != "r2", "algo.old_logprobs",
                 "rollout skips the trainer's pi_old pass whose routing r2 replays: use recompute, or r3")  # fmt: skip
        _require(a.tis_cap == 0, "algo.old_logprobs",
                 "rollout makes pi_old = pi_rollout, so algo.tis_cap would correct nothing: use recompute")  # fmt: skip
    if a.routing_replay != "none":
        _require(m.is_moe, "algo.routing_replay", "routing replay needs an MoE model (model.num_experts > 0)")
    if a.routing_replay == "r3":
        _require(
            r.engine == "sglang",
            "algo.routing_replay",
            "r3 replays the rollout engine's routing, which only rollout.engine=sglang reports",
        )


def _validate_sglang(g: SGLangConfig) -> None:
    for name in ("num_servers", "tp", "max_concurrency"):
        _require(getattr(g, name) >= 1, f"rollout.sglang.{name}", f"must be >= 1, got {getattr(g, name)}")
    for name in ("retries", "max_restarts", "verify_sequences", "max_total_tokens", "base_gpu_id", "cpu_threads"):
        _require(getattr(g, name) >= 0, f"rollout.sglang.{name}", f"must be >= 0, got {getattr(g, name)}")
    for name in ("bucket_mb", "verify_tol", "startup_timeout_s", "request_timeout_s"):
        _require(getattr(g, name) > 0, f"rollout.sglang.{name}", f"must be > 0, got {getattr(g, name)}")
    _require(g.retry_backoff_s >= 0, "rollout.sglang.retry_backoff_s", f"must be >= 0, got {g.retry_backoff_s}")


def _validate_batching(cfg: Config) -> None:
    r, p, a, t = cfg.rollout, cfg.parallel, cfg.algo, cfg.train
    _require(r.n >= 2 or a.advantage == "drgrpo", "rollout.n", f"group advantages need n >= 2, got {r.n}")
    _require(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _require(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _require(r.async_steps in (0, 1), "rollout.async_steps", f"must be 0 or 1 (steps ahead), got {r.async_steps}")
    _require(not r.local_process or r.engine == "local", "rollout.local_process", "needs rollout.engine=local")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _require(t.logprob_micro_batch_size >= 0, "train.logprob_micro_batch_size", "must be >= 0 (0: micro_batch_size)")
    # megatron's interleaved schedule needs at least pp micro-batches, and packing makes the count vary
    _require(
        not (t.pack_sequences and p.vpp),
        "train.pack_sequences",
        "packing is not supported with a virtual pipeline (parallel.vpp): unset one of them",
    )
    samples = r.prompts_per_step * r.n
    per_minibatch, rem = divmod(samples, a.minibatches)
    _require(
        rem == 0,
        "algo.minibatches",
        f"rollout.prompts_per_step*rollout.n={samples} samples must split evenly into {a.minibatches} mini-batches",
    )
    per_rank, rem = divmod(per_minibatch, p.dp)
    _require(rem == 0, "parallel.dp", f"a mini-batch of {per_minibatch} samples must split evenly over dp={p.dp}")
    _require(
        per_rank % t.micro_batch_size == 0,
        "train.micro_batch_size",
        f"the {per_rank} samples of a mini-batch per DP rank must split into micro-batches of {t.micro_batch_size}",
    )
    total = cfg.data.max_prompt_len + r.max_new_tokens
    _require(
        total <= cfg.model.max_seq_len,
        "model.max_seq_len",
        f"data.max_prompt_len + rollout.max_new_tokens = {total} exceeds max_seq_len={cfg.model.max_seq_len}",
    )
    _require(t.steps >= 0, "train.steps", "must be >= 0")
    _require(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg.diagnostics.router_every >= 0, "diagnostics.router_every", "must be >= 0 (0 = off)")
    if cfg.data.weights:
        _require(
            len(cfg.data.weights) == len(cfg.data.paths),
            "data.weights",
            f"one weight per path: {len(cfg.data.weights)} weights for {len(cfg.data.paths)} paths",
        )


def validate_config(cfg: Config) -> Config:
    """Raise ConfigError naming the key and the rule; returns cfg for chaining."""
    _validate_model(cfg.model)
    _validate_parallel(cfg.model, cfg.parallel)
    _validate_algo(cfg.algo, cfg.model, cfg.rollout)
    _validate_batching(cfg)
    _validate_sglang(cfg.rollout.sglang)
    wandb_ok = not cfg.logging.wandb_project or importlib.util.find_spec("wandb") is not None
    _require(wandb_ok, "logging.wandb_project", "needs the wandb package (pip install wandb), or unset the key")
    return cfg
