"""megatron_sapo vs TRL's GRPOTrainer(loss_type="sapo") on the tiny CPU recipe: steps/s and peak memory.

    pip install -e .[bench]            # trl==1.16.0 (benchmark-only; keeps transformers 4.x)
    HF_HUB_OFFLINE=1 python tools/bench_vs_trl.py                  # 6 rollout steps each (a few minutes)
    HF_HUB_OFFLINE=1 python tools/bench_vs_trl.py --steps 12 --workdir /tmp/bench --keep
    HF_HUB_OFFLINE=1 python tools/bench_vs_trl.py --threads 1 --repeats 2 --steps 10      # like for like
    HF_HUB_OFFLINE=1 python tools/bench_vs_trl.py --threads 1 --repeats 2 --steps 10 --ours fast
    HF_HUB_OFFLINE=1 python tools/bench_vs_trl.py --our-override algo.old_logprobs=rollout   # any overrides

What a small-model user would run instead of megatron_sapo is TRL's GRPOTrainer with loss_type="sapo".
Both sides start from the SAME weights (megatron-core's seeded init of examples/tiny_moe_cpu.yaml, exported
to a Hugging Face Qwen3-MoE folder with megatron_sapo.rollout.weights), use the same character tokenizer,
the same prompts in the same order (our prompt sampler's draw for every step, given to TRL unshuffled), the
same `copy` reward (megatron_sapo.rewards.compute_reward) and the same recipe. Each side runs in its own
subprocess; this process samples the RSS of each process tree (psutil, every 20 ms; RSS counts a library
mapped by two processes twice, so the proportional set size PSS is also sampled, every 0.5 s) and the moment each
rollout step finishes (ours: a new line in run.dir/metrics.jsonl; TRL: a line written by a callback).
steps/s = (steps - 1) / (end of last step - end of step 1): the first step (warm-up) is excluded on both.
Start-up (imports, model build) is reported separately as wall time; it is not in steps/s. Also printed: the
median step time and the process tree's CPU seconds per step (user + system over the same window), which
moves far less than wall time when other jobs share the cores; --repeats R runs each side R times in
alternating order and the headline takes each side's best steps/s (and largest peak RSS).

Our recipe -> TRL GRPOConfig (trl_config_kwargs below); one rollout step = one TRL "generation" =
`algo.minibatches` TRL optimizer steps (TRL's global_step counts optimizer steps):
    rollout.prompts_per_step x rollout.n = 4 x 8 = 32 samples  -> generation_batch_size 32, num_generations 8
    algo.minibatches = 4 (4 optimizer steps of 8 samples)       -> steps_per_generation = 4 x grad_accum
    train.micro_batch_size = 8 (1 micro-batch per mini-batch)   -> per_device_train_batch_size 8,
                                                                   gradient_accumulation_steps 1
    (TRL's steps_per_generation counts micro-batches: 4 x 8 = 32 rows, 4 / 1 = 4 optimizer steps)
    train.logprob_micro_batch_size = 32 (old log-probs: one pass) -> TRL has no such knob: its old-log-prob
                                                                   pass runs per_device_train_batch_size rows
    train.steps = N                                             -> max_steps = N x 4
    rollout.max_new_tokens 8, temperature 1.0, top_p 1, no top-k -> max_completion_length 8, temperature 1.0,
                                                                   top_p 1.0, top_k 0
    algo.loss sapo, tau_pos 1.0, tau_neg 1.05                   -> loss_type "sapo", sapo_temperature_pos/neg
    algo.agg seq-mean-token-mean                                -> the sapo loss's own aggregation (the same)
    algo.advantage grpo ((r - mean) / (std + eps) per group)    -> scale_rewards "group"
    algo.kl_coef 0, no reference model                          -> beta 0.0 (TRL then loads no ref model)
    old log-probs recomputed once per rollout                   -> num_iterations 1 (TRL recomputes them
                                                                   because steps_per_generation > grad_accum)
    optim: Adam lr 3e-3 constant, no warm-up, wd 0, clip 1.0    -> learning_rate, lr_scheduler_type "constant",
                                                                   weight_decay 0, adam_*, max_grad_norm
    fp32 on CPU, no recompute, router aux loss coeff 1e-3        -> bf16/fp16 False, use_cpu, gradient_checkpointing
                                                                   False (TRL defaults it to True),
                                                                   router_aux_loss_coef
    rollout.engine local (HF generate, KV cache)                -> use_vllm False (HF generate, KV cache)
Plus report_to "none", save_strategy "no", shuffle_dataset False, the same torch thread count (--threads,
default the cores; on a shared 2-core box use --threads 1: two intra-op threads on busy cores make single ops
wait for a descheduled peer, and either side's run can slow down 10x or more).

`--ours fast` runs our side as we recommend for a small CPU box instead (fast_overrides): the local engine in a
child process of its own generating the next step while this one trains (rollout.local_process,
rollout.async_steps=1: one-step off-policy, where TRL stays on-policy), pi_old taken from the rollout engine
(algo.old_logprobs=rollout: no pi_old pass), and the trainer and the child splitting --threads (at least one
each). It uses a second process and core, which TRL's GRPOTrainer cannot use for this (its own --threads 2 run
is slower than --threads 1 on the 2-core box), and that process's memory. Its figure line is
steps_per_s_vs_trl_fast; like for like (the default) it is steps_per_s_vs_trl.

Caveats: both generate with transformers' generate() on the same HF model class, so generation costs the
same in principle; the difference is the training side (Megatron-Core's MoE layers, fused loss glue) and
the per-step plumbing (tools/bench_engine_vs_hf.py times the engine's update against the HF model's
alone). TRL also computes per-token entropy on every training forward (it always does).
Ours writes a checkpoint after the last step (megatron-core's writer forks: the tree's RSS briefly doubles,
shared pages counted twice); that is outside both the timed window and the headline RSS window (start-up
through the last step) and shown separately as "(all)"; TRL is told to save nothing. Sampling is seeded
differently on the two sides, so completions and rewards differ step by step; mean rewards are printed only
as a sanity check that both train the same task. On a shared machine other jobs' load changes wall times a
lot (the load average is printed); compare runs made at the same time, or use --repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "tiny_moe_cpu.yaml")
POLL_S = 0.02
PSS_EVERY = 25  # polls between PSS samples (reading smaps costs a few ms per process)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ------------------------------------------------------------------------------------------------------------
# the recipe mapping (pure: no trl import, unit-tested)
# ------------------------------------------------------------------------------------------------------------
def trl_geometry(prompts_per_step: int, n: int, minibatches: int, micro_batch_size: int) -> dict:
    """Batch geometry of one rollout step in TRL's terms (one process)."""
    samples = prompts_per_step * n
    if samples % minibatches:
        raise ValueError(f"{samples} samples per step do not split into {minibatches} mini-batches")
    minibatch = samples // minibatches
    if minibatch % micro_batch_size:
        raise ValueError(f"mini-batch of {minibatch} does not split into micro-batches of {micro_batch_size}")
    accum = minibatch // micro_batch_size
    return {
        "num_generations": n,
        "per_device_train_batch_size": micro_batch_size,
        "gradient_accumulation_steps": accum,
        "steps_per_generation": minibatches * accum,  # counts micro-batches (TRL's `_step`)
    }


def trl_config_kwargs(cfg, steps: int, output_dir: str) -> dict:
    """GRPOConfig keyword arguments equivalent to our config `cfg` (a megatron_sapo.config.Config)."""
    r, a, o = cfg.rollout, cfg.algo, cfg.optim
    if a.loss != "sapo" or a.advantage != "grpo" or a.agg != "seq-mean-token-mean":
        raise ValueError("the TRL mapping covers loss=sapo, advantage=grpo, agg=seq-mean-token-mean only")
    if o.lr_decay != "constant" or o.lr_warmup_steps:
        raise ValueError("the TRL mapping covers a constant learning rate without warm-up only")
    return {
        "output_dir": output_dir,
        **trl_geometry(r.prompts_per_step, r.n, a.minibatches, cfg.train.micro_batch_size),
        "max_steps": steps * a.minibatches,  # TRL steps are optimizer steps
        "max_completion_length": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": 0,
        "loss_type": "sapo",
        "sapo_temperature_pos": a.tau_pos,
        "sapo_temperature_neg": a.tau_neg,
        "scale_rewards": "group",
        "beta": a.kl_coef,
        "num_iterations": 1,
        "learning_rate": o.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": o.weight_decay,
        "adam_beta1": o.adam_beta1,
        "adam_beta2": o.adam_beta2,
        "adam_epsilon": o.adam_eps,
        "max_grad_norm": o.clip_grad,
        # MoE load balancing: TRL adds coef * aux_loss on its training forwards (not during generation)
        "router_aux_loss_coef": 0.0 if cfg.model.moe_router_load_balancing == "none" else cfg.model.moe_aux_loss_coeff,
        "seed": cfg.train.seed,
        "use_vllm": False,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "shuffle_dataset": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "log_completions": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


def fast_overrides(threads: int) -> list[str]:
    """`--ours fast`: async generation in a child process, pi_old from the rollout, threads split with the child."""
    return [f"parallel.cpu_threads={max(1, threads // 2)}", "rollout.local_process=true", "rollout.async_steps=1",
            "algo.old_logprobs=rollout"]  # fmt: skip


def our_extra_overrides(args: argparse.Namespace, threads: int) -> list[str]:
    """Our side's overrides beyond the recipe: the --ours preset's, then every --our-override."""
    return (fast_overrides(threads) if args.ours == "fast" else []) + list(args.our_override)


def our_overrides(steps: int, run_dir: str, dp: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    base = [f"train.steps={steps}", f"run.dir={run_dir}", "checkpoint.resume=none", "logging.plots=false"]
    return base + ([f"parallel.dp={dp}"] if dp > 1 else []) + list(extra)


def load_cfg(steps: int, run_dir: str):
    from megatron_sapo.config import load_config

    return load_config(CONFIG, our_overrides(steps, run_dir))


# ------------------------------------------------------------------------------------------------------------
# workers (each in its own subprocess)
# ------------------------------------------------------------------------------------------------------------
def worker_export(spec: dict) -> None:
    """Our seeded initial weights -> an HF Qwen3-MoE folder (+ the tokenizer), what TRL loads."""
    from megatron_sapo.data.tokenizer import EOS_ID
    from megatron_sapo.megatron.engine import MegatronEngine
    from megatron_sapo.rollout.weights import megatron_to_hf, save_hf_checkpoint

    cfg = load_cfg(spec["steps"], spec["our_dir"])
    engine = MegatronEngine(cfg)
    try:
        hf_state = megatron_to_hf(engine.global_state_dict(), cfg.model)
    finally:
        engine.shutdown()
    save_hf_checkpoint(hf_state, cfg.model, spec["hf_dir"], eos_token_id=EOS_ID)
    for name in os.listdir(spec["tokenizer_dir"]):
        shutil.copy(os.path.join(spec["tokenizer_dir"], name), spec["hf_dir"])


def worker_trl(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_sapo.rewards import compute_reward

    torch.set_num_threads(spec["threads"])
    cfg = load_cfg(spec["steps"], spec["our_dir"])
    minibatches = cfg.algo.minibatches
    with open(spec["prompts"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"], "task": r["task"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)

    def reward(prompts, completions, answer, task, **_):
        return [
            compute_reward(t, c, {"prompt": p, "answer": a, "task": t})
            for p, c, a, t in zip(prompts, completions, answer, task)
        ]

    progress = open(spec["progress"], "a", encoding="utf-8")  # noqa: SIM115 (closed below)
    rewards: list[float] = []

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % minibatches == 0:
                line = {"step": state.global_step // minibatches, "t": time.time()}
                progress.write(json.dumps(line) + "\n")
                progress.flush()

    config = GRPOConfig(**trl_config_kwargs(cfg, spec["steps"], spec["trl_dir"]))
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[Progress()],
    )  # fmt: skip
    trainer.train()
    progress.close()
    with open(spec["trl_summary"], "w", encoding="utf-8") as f:
        json.dump({"reward_logs": rewards}, f)


# ------------------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------------------
def tree_processes(proc) -> list:
    """A process and its live descendants ([] once it is gone)."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def tree_usage(proc) -> tuple[int, float]:
    """(RSS bytes, user + system CPU seconds) summed over a process and its live descendants."""
    import psutil

    rss, cpu = 0, 0.0
    for p in tree_processes(proc):
        with contextlib.suppress(psutil.Error):
            rss += p.memory_info().rss
            times = p.cpu_times()
            cpu += times.user + times.system
    return rss, cpu


def tree_pss(proc) -> int:
    """Proportional set size summed over a process and its live descendants: shared pages (the same torch
    libraries mapped by two processes) are split between the processes instead of counted in each."""
    import psutil

    total = 0
    for p in tree_processes(proc):
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def run_side(name: str, cmd: list[str], progress_path: str, steps: int, log_path: str, env: dict) -> dict:
    """Run one side; sample its process tree's RSS and the time each rollout step's line appears."""
    import psutil

    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(popen.pid)
        peak, peak_all, peak_pss, step_times, step_cpu, seen, polls = 0, 0, 0, [], [], 0, 0
        while popen.poll() is None:
            rss, cpu = tree_usage(proc)
            peak_all = max(peak_all, rss)
            if seen < steps:  # start-up and training, up to the last step's line
                peak = max(peak, rss)
                if polls % PSS_EVERY == 0:
                    peak_pss = max(peak_pss, tree_pss(proc))
            polls += 1
            lines = count_lines(progress_path)
            if lines > seen:
                now = time.time()
                step_times.extend([now] * (lines - seen))
                step_cpu.extend([cpu] * (lines - seen))
                seen = lines
            time.sleep(POLL_S)
        wall = time.time() - start
    if popen.returncode != 0 or seen < steps:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"{name} failed (exit {popen.returncode}, {seen}/{steps} steps); log {log_path}:\n{tail}")
    first, last = step_times[0], step_times[steps - 1]
    durations = sorted(b - a for a, b in zip(step_times[: steps - 1], step_times[1:steps]))
    return {
        "steps_per_s": (steps - 1) / (last - first),
        "median_step_s": durations[len(durations) // 2],
        "cpu_s_per_step": (step_cpu[steps - 1] - step_cpu[0]) / (steps - 1),
        "peak_rss": peak,
        "peak_rss_all": peak_all,
        "peak_pss": peak_pss,
        "wall_s": wall,
        "startup_s": first - start,
    }


def sample_prompts(cfg, tokenizer_dir: str, count: int) -> list[dict]:
    """Our prompt sampler's draws, in order: what our trainer uses for its first `count` prompts."""
    from transformers import AutoTokenizer

    from megatron_sapo.data.prompts import build_prompt_source_from_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    source = build_prompt_source_from_config(cfg.data, tokenizer, cfg.train.seed)
    return [{k: p.sample[k] for k in ("prompt", "answer", "task")} for p in source.sample(count)]


def main_bench(args: argparse.Namespace) -> int:
    from megatron_sapo.data.tokenizer import build_tiny_tokenizer

    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is the warm-up)")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_vs_trl_")
    if os.path.isdir(work) and os.listdir(work):
        if not os.path.exists(os.path.join(work, "spec.json")):
            raise SystemExit(f"--workdir {work} is not empty and not an earlier bench folder; refusing to clear it")
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    spec = {
        "steps": args.steps,
        "our_dir": os.path.join(work, "ours"),
        "hf_dir": os.path.join(work, "init_hf"),
        "tokenizer_dir": os.path.join(work, "tokenizer"),
        "prompts": os.path.join(work, "prompts.jsonl"),
        "progress": os.path.join(work, "trl_progress.jsonl"),
        "trl_dir": os.path.join(work, "trl"),
        "trl_summary": os.path.join(work, "trl_summary.json"),
        "threads": args.threads or os.cpu_count() or 1,  # intra-op threads per process, both sides
    }
    spec_path = os.path.join(work, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(spec["threads"])}
    cfg = load_cfg(args.steps, spec["our_dir"])
    build_tiny_tokenizer(spec["tokenizer_dir"], vocab_size=cfg.model.vocab_size)
    rows = sample_prompts(cfg, spec["tokenizer_dir"], cfg.rollout.prompts_per_step * args.steps)
    with open(spec["prompts"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    load_before = os.getloadavg()[0]
    print(f"workdir {work}; exporting our seeded initial weights for TRL ...", flush=True)
    me = [sys.executable, os.path.abspath(__file__)]
    with open(os.path.join(work, "export.log"), "w", encoding="utf-8") as log:
        done = subprocess.run([*me, "--worker", "export", spec_path], cwd=REPO, env=env, stdout=log, stderr=log)
    if done.returncode:
        raise SystemExit(f"exporting the initial weights failed; see {os.path.join(work, 'export.log')}")

    our_metrics = os.path.join(spec["our_dir"], "metrics.jsonl")
    extra = our_extra_overrides(args, spec["threads"])
    commands = {
        "megatron_sapo": ([sys.executable, "-m", "megatron_sapo.cli", "train", CONFIG, *our_overrides(args.steps,
                          spec["our_dir"], args.our_dp, tuple(extra))], our_metrics),
        "trl": ([*me, "--worker", "trl", spec_path], spec["progress"]),
    }  # fmt: skip
    runs: dict[str, list[dict]] = {"megatron_sapo": [], "trl": []}
    for repeat in range(args.repeats):
        order = ["megatron_sapo", "trl"] if (repeat + args.trl_first) % 2 == 0 else ["trl", "megatron_sapo"]
        for name in order:
            print(f"[{repeat + 1}/{args.repeats}] running {name} ({args.steps} rollout steps) ...", flush=True)
            shutil.rmtree(spec["our_dir"], ignore_errors=True)
            for path in (spec["progress"], spec["trl_summary"]):
                if os.path.exists(path):
                    os.remove(path)
            cmd, progress = commands[name]
            side_env = env
            if name == "megatron_sapo" and args.our_dp > 1:  # the same cores: threads split over our ranks
                side_env = {**env, "OMP_NUM_THREADS": str(max(1, spec["threads"] // args.our_dp))}
            result = run_side(name, cmd, progress, args.steps, os.path.join(work, f"{name}.log"), side_env)
            if name == "trl":
                with open(spec["trl_summary"], encoding="utf-8") as f:
                    rewards = json.load(f)["reward_logs"]
            else:
                with open(our_metrics, encoding="utf-8") as f:
                    rewards = [json.loads(line)["reward_mean"] for line in f if line.strip()]
            result["reward"] = sum(rewards) / len(rewards) if rewards else float("nan")
            runs[name].append(result)
    report(args, spec, runs, load_before)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_runs(runs: dict[str, list[dict]], columns: list[tuple], first: str) -> None:
    """One table row per run: `columns` are (title, width, value function)."""
    header = f"{first:<15}{'run':>4}" + "".join(f"{title:>{w}}" for title, w, _ in columns)
    print(header)
    print("-" * len(header))
    for name, results in runs.items():
        for i, r in enumerate(results):
            print(f"{name:<15}{i + 1:>4}" + "".join(f"{value(r):>{w}}" for _, w, value in columns))


def report(args, spec: dict, runs: dict, load_before: float) -> None:
    from importlib.metadata import version

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "megatron-core", "transformers", "trl"))
    print()
    print(f"machine: {cores}-core CPU ({platform.machine()}), no GPU; {versions}; torch threads {spec['threads']}")
    if args.our_dp > 1:
        threads = max(1, spec["threads"] // args.our_dp)
        print(f"megatron_sapo: parallel.dp={args.our_dp} ({args.our_dp} processes x {threads} threads); TRL: 1 process")
    extra = our_extra_overrides(args, spec["threads"])
    if extra:
        print(f"megatron_sapo overrides: {' '.join(extra)} (TRL: the mapping above, unchanged)")
    print(f"load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f} (shared machines: noisy)")
    print(
        f"recipe: examples/tiny_moe_cpu.yaml, {args.steps} rollout steps per run (4 prompts x 8 samples, "
        f"4 optimizer steps each); steps/s over steps 2..{args.steps} (step 1 = warm-up)"
    )
    columns = [  # (title, width, value)
        ("steps/s", 9, lambda r: f"{r['steps_per_s']:.3f}"),
        ("s/step", 8, lambda r: f"{1 / r['steps_per_s']:.2f}"),
        ("median s/step", 15, lambda r: f"{r['median_step_s']:.2f}"),
        ("peak RSS MiB", 14, lambda r: f"{r['peak_rss'] / 2**20:.0f}"),
        ("(all)", 7, lambda r: f"{r['peak_rss_all'] / 2**20:.0f}"),
        ("peak PSS MiB", 14, lambda r: f"{r['peak_pss'] / 2**20:.0f}"),
        ("CPU s/step", 12, lambda r: f"{r['cpu_s_per_step']:.2f}"),
        ("start-up s", 12, lambda r: f"{r['startup_s']:.1f}"),
        ("wall s", 8, lambda r: f"{r['wall_s']:.1f}"),
        ("mean reward", 13, lambda r: f"{r['reward']:.3f}"),
    ]
    print_runs(runs, columns, first="side")
    best = {}
    for name, results in runs.items():
        best[name] = {
            "steps_per_s": max(r["steps_per_s"] for r in results),
            "peak_rss": max(r["peak_rss"] for r in results),
            "peak_pss": max(r["peak_pss"] for r in results),
        }
    ours, ref = best["megatron_sapo"], best["trl"]
    print(
        "peak RSS: process tree, start-up through the last step; (all): the whole run, with our end-of-run "
        "checkpoint (its writer forks: shared pages counted twice; TRL saves nothing); peak PSS: the same window, "
        f"sampled every {PSS_EVERY * POLL_S:.1f} s, pages shared between the tree's processes counted once"
    )
    if args.repeats > 1:
        print(f"ratios: best steps/s and largest peak RSS of each side over {args.repeats} runs")
    print()
    figure = "steps_per_s_vs_trl" + ("_fast" if args.ours == "fast" else "")
    figure += "_with_overrides" if args.our_override else ""  # not the like-for-like one
    print(f"{figure} ratio={ours['steps_per_s'] / ref['steps_per_s']:.3f} goal>=1.5")
    print(f"peak_rss_vs_trl ratio={ours['peak_rss'] / ref['peak_rss']:.3f} goal<=1.0")
    print(f"peak_pss_vs_trl ratio={ours['peak_pss'] / ref['peak_pss']:.3f} goal<=1.0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="rollout steps per side (the first is a warm-up)")
    parser.add_argument("--workdir", help="keep run folders and logs here (default: a temp folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating the order (best kept)")
    parser.add_argument("--trl-first", action="store_true", help="run TRL before megatron_sapo")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per process (default: the cores)")
    parser.add_argument(
        "--our-dp", type=int, default=1, help="our data-parallel ranks (processes; threads split between them)"
    )
    parser.add_argument(
        "--ours",
        choices=("like-for-like", "fast"),
        default="like-for-like",
        help="our side: the same recipe as TRL's (default), or fast: async rollouts in a child process (see above)",
    )
    parser.add_argument(
        "--our-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra override for our side only, e.g. rollout.async_steps=1 (repeatable; printed in the report)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker[1], encoding="utf-8") as f:
            spec = json.load(f)
        {"export": worker_export, "trl": worker_trl}[args.worker[0]](spec)
        return 0
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
