"""The configuration: one tree of typed dataclasses, filled from YAML plus dotted overrides, validated.

    overrides = ["algo.tau_neg=1.1", "parallel.tp=2", "parallel.etp=2", "parallel.sp=true"]
    cfg = load_config("examples/tiny_moe_cpu.yaml", overrides)

Every error names the key (and the YAML file and line when the value came from a file) and the rule.
Validation is integer arithmetic on the config alone, so it runs before any process is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import yaml


class InputError(ValueError):
    """Input the user can fix (a config key, a data file, a checkpoint or model path); the message names it.
    The command line prints it as one line and exits 2, without a traceback (cli.main)."""


class ConfigError(InputError):
    """A configuration problem; the message names the key and the rule it broke."""


# ----------------------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """A Qwen3-MoE style decoder. num_experts = 0 gives a dense model (used as the routing control)."""

    name: str = "tiny-moe"
    hf_path: str | None = None  # HF checkpoint to import through Megatron-Bridge; None = random init
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups; None = one per head
    kv_channels: int | None = None  # head dim; None = hidden / heads
    ffn_hidden_size: int = 256  # dense MLP width (dense model or dense layers)
    num_experts: int = 4
    moe_topk: int = 2
    moe_ffn_hidden_size: int = 128
    moe_shared_expert_ffn_hidden_size: int = 0  # 0 = no shared expert
    moe_router_load_balancing: Literal["none", "aux_loss", "seq_aux_loss"] = "aux_loss"
    moe_aux_loss_coeff: float = 1e-3
    moe_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    max_seq_len: int = 128
    qk_layernorm: bool = True
    rotary_base: int = 10000
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    # Random initial weights (without model.hf_path). megatron: megatron-core's own RNG streams, which depend on
    # the layout. seeded: every per-layer / per-expert tensor drawn from a generator seeded by (train.seed, its
    # name) with megatron's init rules, so TP/PP/EP/DP layouts start from identical weights.
    init: Literal["megatron", "seeded"] = "megatron"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # Activation recompute in training (megatron TransformerConfig fields of the same names). full: whole
    # layers, chosen by recompute_method / recompute_num_layers; selective: the recompute_modules.
    recompute_granularity: Literal["none", "full", "selective"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"  # full only
    recompute_num_layers: int = 1  # full: layers per unit (uniform) / recomputed layers per stage (block)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective only

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per stage
    ep: int = 1
    etp: int = 1  # expert tensor parallel
    cp: int = 1
    dp: int = 1
    sp: bool = False  # sequence parallel (required with tp > 1 for MoE layers)
    # CPU only: intra-op threads per rank; 0 = OMP_NUM_THREADS when set, else the cores / ranks on this node
    cpu_threads: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass
class AlgoConfig:
    loss: str = "sapo"  # sapo | grpo | gspo | gspo_token
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    # Clip bounds of grpo / gspo / gspo_token; None = that loss's own default (algo.losses.loss_defaults:
    # grpo 0.2 / 0.27, gspo and gspo_token 3e-4 / 4e-4, SAPO.md), filled in by load_config.
    eps_low: float | None = None
    eps_high: float | None = None
    agg: str = "seq-mean-token-mean"
    advantage: str = "grpo"  # grpo | drgrpo | rloo
    adv_eps: float = 1e-6
    kl_coef: float = 0.0
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    routing_replay: Literal["none", "r2", "r3"] = "none"
    minibatches: int = 4  # optimizer steps per rollout
    tis_cap: float = 0.0  # truncated importance sampling cap C on pi_old / pi_rollout; 0 = off
    tis_level: Literal["token", "sequence"] = "token"
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    # pi_old of the ratio: "recompute" = a trainer forward pass before the updates (measures the train/rollout
    # mismatch); "rollout" = the rollout engine's log-probs of the sampled tokens (no pass: one forward fewer
    # per step; with async rollouts the true behaviour policy). r2 and tis_cap need "recompute".
    old_logprobs: Literal["recompute", "rollout"] = "recompute"


@dataclass
class SGLangConfig:
    urls: list[str] = field(default_factory=list)  # attach to these servers; empty = launch
    num_servers: int = 1
    tp: int = 1
    base_port: int = 30000
    python: str = "python"  # interpreter of the SGLang environment
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    max_concurrency: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees a GPU, else cpu
    host: str = "127.0.0.1"
    base_gpu_id: int = 0  # server i uses GPUs base_gpu_id + i*tp ... + tp - 1
    max_total_tokens: int = 0  # KV-cache tokens per server; 0 = 32768 on CPU, SGLang's default on GPU
    return_routed_experts: bool = True  # MoE models: Sample.routed_experts [tokens, layers, topk]
    retries: int = 2  # extra attempts of a failed request (unreachable / 5xx / timeout), with backoff
    retry_backoff_s: float = 0.5  # first wait; doubles per attempt
    max_restarts: int = 2  # restarts of launched servers that died, per engine
    bucket_mb: float = 512.0  # weight-sync bucket: the trainer gathers and sends this much at a time (any engine)
    verify_sequences: int = 2  # after each sync: greedy sequences whose served log-probs are checked; 0 = off
    verify_tol: float = 1e-3  # max |served - trainer| log-prob allowed by that check
    router: bool = False  # sglang-router in front of the servers: generation through it, weight syncs to each
    router_args: list[str] = field(default_factory=list)  # more launch_router args, e.g. [--policy, round_robin]
    cpu_threads: int = 0  # CPU servers: OpenMP threads each (OMP_NUM_THREADS); 0 = inherit the environment


@dataclass
class RolloutConfig:
    engine: Literal["local", "sglang"] = "local"
    n: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    weight_sync: Literal["disk", "tensor", "distributed"] = "disk"
    # 1: the next step's rollout is generated (weights one step old) while this step trains (one-step
    # off-policy, as slime's and verl's async modes); 0: rollout and training take turns
    async_steps: int = 0
    # engine local only: generate in a child process (own GIL and core) on shared-memory weights, so that with
    # async_steps=1 generation overlaps training on a CPU box; costs one more process (its imports' memory)
    local_process: bool = False
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # JSONL / Parquet prompt files; empty = synthetic task
    weights: list[float] = field(default_factory=list)  # task-mixing weights, one per path
    synthetic_task: str = "copy"  # copy | reverse | add (megatron_sapo/data/synthetic.py)
    tokenizer: str | None = None  # HF tokenizer folder; None = model.hf_path's, else the tiny char tokenizer
    max_prompt_len: int = 32  # longer prompts are dropped and counted, never truncated
    prompt_key: str = "prompt"
    image_tokens: int = 0  # tokens counted per image of a prompt toward max_prompt_len (the processor adds them)


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 1234
    micro_batch_size: int = 4  # sequences per micro-batch
    logprob_micro_batch_size: int = 0  # for forward-only passes (old/ref log-probs); 0 = micro_batch_size
    # several sequences per micro-batch row (block-diagonal causal mask; megatron's local attention only):
    # micro-batch sizes then count rows of the batch's longest length, not sequences
    pack_sequences: bool = False
    max_skipped_steps: int = 3  # consecutive steps skipped for NaN rewards / losses before the run stops


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = False


@dataclass
class DiagnosticsConfig:
    router_every: int = 0  # steps between router-variance decompositions; 0 = off
    max_sequences: int = 64  # sequences of the whole-step decomposition; each mini-batch one gets 1/minibatches


@dataclass
class LoggingConfig:
    console_every: int = 1
    tensorboard: bool = False
    wandb_project: str | None = None
    plots: bool = True
    progress: bool = True  # tqdm bars for rollout and updates; drawn only when stderr is a terminal


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    every: int = 0  # rollout steps between checkpoints; 0 = only at the end
    resume: str = "auto"  # auto | none | a checkpoint path
    keep: int = 2
    # SIGTERM / SIGUSR1: checkpoint at the next step boundary and exit 75 (megatron_sapo/preemption.py)
    save_on_signal: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------------------------------------
# Filling the tree from plain data, with type checks
# ----------------------------------------------------------------------------------------------------------
def _where(key: str, lines: dict[str, str]) -> str:
    return f" ({lines[key]})" if key in lines else ""


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Returns the value."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}'{where}: null is not allowed")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}'{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}'{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, key, where) for v in value]
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; it is a float to every user.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}'{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}'{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}'{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}'{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported annotation {tp}")  # a bug in this file


def _fill(obj: Any, data: dict, prefix: str, lines: dict[str, str]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            section = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"unknown config key '{key}'{_where(key, lines)}{hint} (valid under {section}: {', '.join(names)})"
            )
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}'{_where(key, lines)}: expected a section (mapping)")
            _fill(current, value, key + ".", lines)
        else:
            setattr(obj, name, _coerce(value, hints[name], key, _where(key, lines)))


def from_dict(data: dict, lines: dict[str, str] | None = None) -> Config:
    cfg = Config()
    _fill(cfg, data or {}, "", lines or {})
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------------
# YAML with line numbers, and dotted overrides
# ----------------------------------------------------------------------------------------------------------
def _node_to_data(node: yaml.Node, path: str, source: str, lines: dict[str, str]) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value
            dotted = f"{path}.{key}" if path else key
            lines[dotted] = f"{source}, line {key_node.start_mark.line + 1}"
            out[key] = _node_to_data(value_node, dotted, source, lines)
        return out
    return yaml.safe_load(yaml.serialize(node))


def load_yaml(path: str) -> tuple[dict, dict[str, str]]:
    """Parse a YAML config file; returns (data, {dotted key: "file, line N"})."""
    try:
        with open(path, encoding="utf-8") as f:
            node = yaml.compose(f, Loader=yaml.SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    lines: dict[str, str] = {}
    return _node_to_data(node, "", path, lines), lines


def apply_overrides(data: dict, overrides: list[str], lines: dict[str, str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) onto nested plain data."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. algo.tau_neg=1.1)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
        lines[key] = f"command-line override '{item}'"
    return data


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + dotted overrides -> validated Config."""
    data, lines = load_yaml(path) if path else ({}, {})
    data = apply_overrides(data, list(overrides), lines)
    cfg = from_dict(data, lines)
    validate(cfg)
    _fill_loss_defaults(cfg.algo)
    return cfg


def _fill_loss_defaults(a: AlgoConfig) -> None:
    """Unset clip bounds become the chosen loss's defaults, so config.yaml shows what the run used (a single
    eps of 0.2 would make GSPO's sequence ratio clip ~500x too loosely). Losses without them keep None."""
    from megatron_sapo.algo import loss_defaults

    for key, value in loss_defaults(a.loss).items():
        if getattr(a, key) is None:
            setattr(a, key, value)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the key and the rule; returns cfg for chaining. The rules: validation.py (it
    imports the tree above, so it is imported here on first use)."""
    from megatron_sapo.validation import validate_config

    return validate_config(cfg)
