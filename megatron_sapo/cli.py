"""`megatron-sapo`: the command line (train, eval, plan, diagnose, convert).

    megatron-sapo train examples/tiny_moe_cpu.yaml algo.tau_neg=1.1 parallel.tp=2 parallel.etp=2 parallel.sp=true

Run plainly, `train` starts as many local processes as the layout needs (gloo on CPU, NCCL on GPU);
under torchrun or srun it joins the world it finds. Bad input exits non-zero with one line naming it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from megatron_sapo.config import Config, ConfigError, InputError, load_config


def _launched_by_a_launcher() -> bool:
    # torchrun sets RANK; srun sets SLURM_NTASKS (a single-task allocation still launches locally).
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


# A rank that stops on bad input writes its one-line message here too: after torchrun's failure report, the
# relaunching process repeats it as the last line and exits 2 (the culprit would otherwise scroll away).
ERROR_FILE_ENV = "MEGATRON_SAPO_ERROR_FILE"


def _relaunch_with_torchrun(argv: list[str], world_size: int) -> int:
    """Start world_size local processes running this same command (torchrun sets RANK etc.)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={world_size}", "-m", "megatron_sapo.cli", *argv,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="megatron_sapo_") as tmp:
        error_file = os.path.join(tmp, "input_error")
        code = subprocess.call(cmd, env={**os.environ, ERROR_FILE_ENV: error_file})
        if code != 0 and os.path.exists(error_file):
            with open(error_file, encoding="utf-8") as f:
                print(f.readline().rstrip("\n"), file=sys.stderr)
            return 2
    return code


class LaunchError(ConfigError):
    """The launcher's environment is incomplete (e.g. srun without MASTER_ADDR)."""


def _tasks_on_this_node(env) -> int | None:
    """This node's task count from SLURM_STEP_TASKS_PER_NODE ("8(x2)", "8,8" or "8"), when all nodes run the
    same number (the only layout the sbatch examples make); None otherwise."""
    counts = set()
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        head = part.split("(", 1)[0]
        if not head.isdigit():
            return None
        counts.add(int(head))
    return counts.pop() if len(counts) == 1 else None


def _adopt_srun_world(env=os.environ) -> bool:
    """srun with one task per GPU: write torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from
    SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, so torch.distributed, megatron and the trainer's
    rank-0 checks see the world srun started. Only inside an srun step (SLURM_STEP_NUM_TASKS: the batch
    shell has no step) with several tasks, and never over a torchrun's variables. True when it set them."""
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return False
    if not env.get("MASTER_ADDR"):
        raise LaunchError(
            "launched by srun with several tasks but MASTER_ADDR is not set: export MASTER_ADDR=<first node of "
            "the job> (e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)) before srun"
        )
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if (local := _tasks_on_this_node(env)) is not None:
        env["LOCAL_WORLD_SIZE"] = str(local)
    env.setdefault("MASTER_PORT", "29500")
    return True


def _relaunch_if_needed(cfg: Config, argv: list[str]) -> int | None:
    """Run plainly with a layout of several processes: start them locally; returns their exit status.
    Under srun (one task per GPU) it adopts srun's world instead (_adopt_srun_world)."""
    if cfg.parallel.world_size > 1 and not _launched_by_a_launcher():
        return _relaunch_with_torchrun(argv, cfg.parallel.world_size)
    _adopt_srun_world()  # a world-1 layout under `srun -n 16` then fails on the size, not as 16 copies
    return None


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = load_config(args.config, args.overrides)
    if (rc := _relaunch_if_needed(cfg, argv)) is not None:
        return rc
    from megatron_sapo.trainer import Preempted, train

    try:
        train(cfg)
    except Preempted as e:  # SIGTERM / SIGUSR1: a complete checkpoint was written; rerun to resume
        return e.exit_code
    return 0


def _parameter_counts(cfg: Config) -> dict[str, int]:
    """Parameters of the whole model, split into dense (replicated over EP) and expert parts."""
    m = cfg.model
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    attn = m.hidden_size * head_dim * (m.num_attention_heads * 2 + groups * 2)
    norms = 2 * m.hidden_size + (2 * head_dim if m.qk_layernorm else 0)
    if m.is_moe:
        expert = 3 * m.hidden_size * m.moe_ffn_hidden_size  # SwiGLU: gate, up, down
        shared = 3 * m.hidden_size * m.moe_shared_expert_ffn_hidden_size
        dense_mlp = m.hidden_size * m.num_experts + shared  # router + shared expert
        experts = m.num_layers * m.num_experts * expert
    else:
        dense_mlp, experts = 3 * m.hidden_size * m.ffn_hidden_size, 0
    embed = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2) + m.hidden_size
    return {"dense": m.num_layers * (attn + norms + dense_mlp) + embed, "experts": experts}


def _state_bytes_per_rank(cfg: Config, counts: dict[str, int]) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer state on one rank (before activations).
    Dense parameters split over tp * pp, experts over ep * etp * pp. Gradients are fp32 buffers
    (megatron/optimizer.py: grad_reduce_in_fp32). Adam keeps two fp32 moments, plus fp32 main params for a
    bf16 model; the distributed optimizer shards that state over the data-parallel ranks that hold the
    same shard: dp * cp for dense parameters, tp * cp * dp / (ep * etp) (expert data parallel) for experts."""
    p = cfg.parallel
    dense = counts["dense"] / (p.tp * p.pp)
    experts = counts["experts"] / (p.ep * p.etp * p.pp)
    bf16 = cfg.model.dtype == "bf16"
    adam = 8 + (4 if bf16 else 0)
    dense_shard, expert_shard = 1, 1
    if cfg.optim.distributed_optimizer:
        dense_shard = p.dp * p.cp
        expert_shard = p.tp * p.cp * p.dp // (p.ep * p.etp)
    return {
        "weights": (dense + experts) * (2 if bf16 else 4),
        "grads": (dense + experts) * 4,
        "optimizer": dense * adam / dense_shard + experts * adam / expert_shard,
    }


def cmd_plan(args: argparse.Namespace, argv: list[str]) -> int:
    """Validate a layout and print what each rank holds, without starting anything."""
    cfg = load_config(args.config, args.overrides)
    p, m = cfg.parallel, cfg.model
    counts = _parameter_counts(cfg)
    per_rank = counts["dense"] / (p.tp * p.pp) + counts["experts"] / (p.ep * p.etp * p.pp)
    print(f"layout: tp={p.tp} pp={p.pp} vpp={p.vpp} ep={p.ep} etp={p.etp} cp={p.cp} dp={p.dp} sp={p.sp}")
    print(f"world size: {p.world_size} processes (tp*pp*cp*dp)")
    print(f"parameters: {counts['dense'] + counts['experts']:,} ({counts['experts']:,} in experts)")
    if m.is_moe:
        active = counts["dense"] + counts["experts"] * m.moe_topk // m.num_experts
        print(f"activated per token: {active:,}")
    print(
        f"layers per pipeline stage: {m.num_layers // p.pp}"
        + (f" ({p.vpp} chunks of {m.num_layers // (p.pp * p.vpp)})" if p.vpp else "")
    )
    if m.is_moe:
        print(f"experts per EP rank: {m.num_experts // p.ep} of {m.num_experts} (expert data parallel: "
              f"{p.tp * p.cp * p.dp // (p.ep * p.etp)})")  # fmt: skip
    print(f"parameters per rank: {per_rank:,.0f}")
    gib = {k: v / 2**30 for k, v in _state_bytes_per_rank(cfg, counts).items()}
    dtype = "bf16" if m.dtype == "bf16" else "fp32"
    print(
        f"weights+grads+optimizer per rank: {sum(gib.values()):.3f} GiB (weights {gib['weights']:.3f}, "
        f"grads {gib['grads']:.3f}, optimizer {gib['optimizer']:.3f}; {dtype} weights; before activations)"
    )
    samples = cfg.rollout.prompts_per_step * cfg.rollout.n
    per_mb = samples // cfg.algo.minibatches // p.dp // cfg.train.micro_batch_size
    print(f"per step: {samples} samples, {cfg.algo.minibatches} mini-batches, {per_mb} micro-batches per DP rank")
    return 0


def cmd_diagnose(args: argparse.Namespace, argv: list[str]) -> int:
    """Router-variance decomposition between two checkpoints (megatron_sapo/diagnostics/diagnose.py)."""
    cfg = load_config(args.config, args.overrides)
    if (rc := _relaunch_if_needed(cfg, argv)) is not None:
        return rc
    from megatron_sapo.diagnostics.diagnose import cmd_diagnose as run

    return run(cfg, args)


def cmd_convert(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = load_config(args.config, args.overrides)
    if (rc := _relaunch_if_needed(cfg, argv)) is not None:
        return rc
    from megatron_sapo.convert import convert

    try:
        convert(cfg, args.checkpoint, args.from_hf, args.to_hf, args.to_checkpoint, args.tokenizer)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"megatron-sapo convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    """Score a checkpoint or an HF folder on prompt datasets (megatron_sapo/evaluate.py)."""
    cfg = load_config(args.config, args.overrides)
    if not args.hf and (rc := _relaunch_if_needed(cfg, argv)) is not None:  # an HF folder needs no Megatron ranks
        return rc
    from megatron_sapo.evaluate import EvalOptions, evaluate

    options = {k: getattr(args, k) for k in ("checkpoint", "hf", "data", "n", "temperature", "max_new_tokens", "limit",
                                             "correct_at", "out")}  # fmt: skip
    opts = EvalOptions(**options)
    try:
        evaluate(cfg, opts)
    except (ValueError, FileNotFoundError, KeyError) as e:  # data errors are ValueErrors naming file and line
        print(f"megatron-sapo eval: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-sapo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (
        ("train", cmd_train, "run RL training (SAPO, GRPO, GSPO) from a YAML config"),
        ("plan", cmd_plan, "validate a parallel layout and print per-rank sizes"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config file (see examples/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.tau_neg=1.1 parallel.tp=2")
        p.set_defaults(fn=fn)
    p = sub.add_parser("diagnose", help="router-variance decomposition between two checkpoints, no training")
    p.add_argument("config", help="YAML config file of the run")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--old", required=True, help="checkpoint of pi_old (e.g. RUN/checkpoints/step_10)")
    p.add_argument("--new", default=None, help="checkpoint of pi_theta (default: --old)")
    p.add_argument("--batch", default=None, help="torch file with tokens [N, S], loss_mask [N, S-1]")
    p.add_argument("--out", default=None, help="also save the metrics as JSON here")
    p.set_defaults(fn=cmd_diagnose)
    ev = sub.add_parser("eval", help="score a checkpoint or HF folder on prompt datasets (reward, pass@k), no training")
    ev.add_argument("config", help="YAML config of the run (model, data, rollout engine)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides")
    ev.add_argument("--checkpoint", help="a complete Megatron checkpoint (default: the run folder's newest)")
    ev.add_argument("--hf", help="an HF folder instead (loaded or served as it is, one process)")
    ev.add_argument("--data", nargs="+", help="prompt files (JSONL / Parquet / hf:NAME); default data.paths")
    ev.add_argument("--n", type=int, default=1, help="samples per prompt (pass@1 and pass@n)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default rollout.max_new_tokens")
    ev.add_argument("--limit", type=int, default=None, help="the first N prompts of each file")
    ev.add_argument("--correct-at", type=float, default=1.0, help="a sample is correct when its reward >= this")
    ev.add_argument("--out", help="output folder (default RUN_DIR/eval/<checkpoint name>)")
    ev.set_defaults(fn=cmd_eval)
    conv = sub.add_parser("convert", help="convert checkpoints: Megatron dist checkpoint <-> HF folder")
    conv.add_argument("config", help="YAML config of the model and the layout to load at")
    conv.add_argument("overrides", nargs="*", help="dotted overrides")
    conv.add_argument("--checkpoint", help="source: a complete Megatron dist checkpoint folder")
    conv.add_argument("--from-hf", help="source: an HF checkpoint folder (*.safetensors)")
    conv.add_argument("--to-hf", help="target: HF folder (config.json, model.safetensors, tokenizer)")
    conv.add_argument("--to-checkpoint", help="target: Megatron dist checkpoint folder")
    conv.add_argument("--tokenizer", help="tokenizer folder to copy into --to-hf")
    conv.set_defaults(fn=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args, argv)
    except InputError as e:  # a config key, data file or path the user can fix: one line, no traceback
        line = f"megatron-sapo {args.command}: error: {e}"
        print(line, file=sys.stderr)
        if os.environ.get(ERROR_FILE_ENV):  # a relaunched rank: for the process that started torchrun
            with open(os.environ[ERROR_FILE_ENV], "a", encoding="utf-8") as f:
                f.write(line.replace("\n", " ") + "\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
