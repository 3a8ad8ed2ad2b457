"""Rollouts generated ahead (rollout.async_steps=1) vs taking turns (0): steps/s of the tiny recipe.

    HF_HUB_OFFLINE=1 python tools/bench_async_rollout.py --engine sglang    # needs tools/sglang_cpu_kit
    HF_HUB_OFFLINE=1 python tools/bench_async_rollout.py --engine local --steps 10 --repeats 2
    HF_HUB_OFFLINE=1 python tools/bench_async_rollout.py --engine local_process --steps 10 --repeats 2

Both modes run examples/tiny_moe_cpu.yaml from the same seeded start, one after the other in alternating
order, each in its own process (tools/bench_vs_trl.run_side: steps/s over steps 2..N from the moments the
metrics lines appear; start-up, including an SGLang server's launch, is not in it). Also printed: the mean
rollout time, the trainer's mean wait on the rollout (`time_rollout_wait_s`) and the samples' staleness.
With `--engine sglang` the server is a separate process with its own thread (rollout.sglang.cpu_threads=1
beside a one-thread trainer), so the two halves can overlap on two cores, as servers beside the trainer's
GPUs do; with `--engine local` the rollout thread shares the trainer's process and Python's GIL; with
`--engine local_process` (rollout.local_process=true) the local engine generates in a child process of its own
(one thread), on the trainer's weights in shared memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import machine_label  # noqa: E402
from bench_vs_trl import CONFIG, OFFLINE_ENV, print_runs, run_side  # noqa: E402 (tools/ is this script's folder)

MODES = {"sync": "rollout.async_steps=0", "async": "rollout.async_steps=1"}


def overrides(args, run_dir: str, mode: str) -> list[str]:
    out = [f"train.steps={args.steps}", f"run.dir={run_dir}", "checkpoint.resume=none", "logging.plots=false",
           "parallel.cpu_threads=1", MODES[mode]]  # fmt: skip
    if args.engine == "sglang":
        kit = args.sglang_python or os.path.join(REPO, ".venv-sglang", "bin", "python")
        if not os.path.exists(kit):
            raise SystemExit(f"no SGLang kit python at {kit}: bash tools/sglang_cpu_kit/setup.sh, or --sglang-python")
        out += ["rollout.engine=sglang", f"rollout.sglang.python={kit}", "rollout.sglang.cpu_threads=1",
                "rollout.sglang.max_total_tokens=4096", f"rollout.sglang.base_port={args.port}"]  # fmt: skip
    if args.engine == "local_process":
        out.append("rollout.local_process=true")
    return out


def summarize(metrics_path: str) -> dict:
    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][1:]  # step 1 (warm-up, never ahead) left out

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    keys = ("time_rollout_s", "time_rollout_wait_s", "rollout_staleness", "reward_mean")
    return {key: mean(key) for key in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("local", "local_process", "sglang"), default="sglang")
    parser.add_argument("--steps", type=int, default=8, help="rollout steps per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating the order (best kept)")
    parser.add_argument("--sglang-python", help="the SGLang kit's python (default .venv-sglang/bin/python)")
    parser.add_argument("--port", type=int, default=31700, help="the SGLang server's port")
    parser.add_argument("--workdir", help="keep run folders and logs here (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    if args.steps < 3:
        raise SystemExit("--steps must be >= 3 (step 1 is a warm-up, and step 2 is the first generated ahead)")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_async_")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]:
            print(f"[{repeat + 1}/{args.repeats}] {mode} ({args.engine} engine, {args.steps} steps) ...", flush=True)
            run_dir = os.path.join(work, mode)
            shutil.rmtree(run_dir, ignore_errors=True)
            metrics = os.path.join(run_dir, "metrics.jsonl")
            cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", CONFIG, *overrides(args, run_dir, mode)]
            result = run_side(mode, cmd, metrics, args.steps, os.path.join(work, f"{mode}.log"), env)
            runs[mode].append({**result, **summarize(metrics)})
    report(args, runs)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args, runs: dict) -> None:
    print(f"\nmachine: {machine_label()}; load average (1 min) {os.getloadavg()[0]:.1f}; engine {args.engine}")
    print(f"recipe: examples/tiny_moe_cpu.yaml, {args.steps} steps per run; means over steps 2..{args.steps}")
    columns = [  # (title, width, value)
        ("steps/s", 9, lambda r: f"{r['steps_per_s']:.3f}"),
        ("median s/step", 15, lambda r: f"{r['median_step_s']:.3f}"),
        ("rollout s", 11, lambda r: f"{r['time_rollout_s']:.3f}"),
        ("wait on rollout s", 19, lambda r: f"{r['time_rollout_wait_s']:.3f}"),
        ("staleness", 11, lambda r: f"{r['rollout_staleness']:.2f}"),
        ("mean reward", 13, lambda r: f"{r['reward_mean']:.3f}"),
    ]
    print_runs(runs, columns, first="mode")
    best = {mode: max(r["steps_per_s"] for r in results) for mode, results in runs.items()}
    print()
    print(f"async_vs_sync_steps_per_s_{args.engine} ratio={best['async'] / best['sync']:.3f} goal>1.0")


if __name__ == "__main__":
    sys.exit(main())
