"""Rollout benchmark: our SGLang client vs driving the same server directly, and weight-sync time per transport.

    python tools/bench_rollout.py                        # launches one CPU server from the kit (.venv-sglang)
    python tools/bench_rollout.py --url http://host:port  # attach to a running server of the same tiny model

Workload: --prompts prompts x --n samples x --new tokens (ignore_eos, so every run generates the same number of
tokens), temperature 1, log-probs on (and routed experts: the engine asks for them on MoE models; the direct
driver asks for the same). "direct" sends the same one-request-per-prompt bodies (engine._body: identical
fields, n, max_new_tokens, sampling params, log-probs, routed experts) at the same concurrency from a plain
thread pool with urllib and only json-decodes the answers; "direct-batch" sends all prompts in one request
(shown for reference: it is not faster here, so batching would not help our client).

Measurement: each rep runs ours and direct back to back, in alternating order (A/B, B/A, ...), so load from
other jobs hits both about equally; the headline is the median over reps of the per-rep ratio
direct seconds / ours seconds (= ours tokens/s / direct tokens/s). --aa adds a second, identical direct
driver: its ratio to direct is the noise floor of this machine (1.0 on a quiet one). The headline comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools", "sglang_cpu_kit"))

from megatron_sapo.config import load_config  # noqa: E402
from megatron_sapo.rollout.base import SamplingParams  # noqa: E402


def post(url: str, body: dict, timeout: float = 600.0):
    req = urllib.request.Request(url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def direct(url: str, bodies: list[dict], concurrency: int) -> int:
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(lambda b: post(url, b), bodies))
    return sum(len(o["output_ids"]) for out in outs for o in (out if isinstance(out, list) else [out]))


def direct_batch(url: str, bodies: list[dict]) -> int:
    body = dict(bodies[0], input_ids=[b["input_ids"] for b in bodies])
    return sum(len(o["output_ids"]) for o in post(url, body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="attach to this server instead of launching one")
    ap.add_argument(
        "--python", default=os.environ.get("SGLANG_KIT_PYTHON", os.path.join(REPO, ".venv-sglang/bin/python"))
    )
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=8, help="alternating A/B reps (even: each order equally often)")
    ap.add_argument("--aa", action="store_true", help="also time a second direct driver (the noise floor)")
    ap.add_argument("--no-batch", dest="batch", action="store_false", help="skip the one-request direct-batch driver")
    ap.add_argument("--sync-reps", type=int, default=3)
    ap.add_argument(
        "--server-threads",
        default="1",
        help="OMP_NUM_THREADS of a launched CPU server ('' = torch's default, one per core). 1 by default: on a "
        "small machine shared with other jobs, two OpenMP threads turn a neighbour's load into 10-40x slower runs",
    )
    args = ap.parse_args()
    if args.server_threads and not args.url:
        os.environ["OMP_NUM_THREADS"] = args.server_threads  # inherited by the server the engine launches

    from make_tiny_model import build

    from megatron_sapo.rollout.sglang_engine import SGLangEngine

    overrides = [
        "rollout.engine=sglang", f"rollout.sglang.python={args.python}", "rollout.sglang.max_total_tokens=8192",
        "rollout.sglang.verify_sequences=0", "rollout.sglang.base_port=32000",
    ]  # fmt: skip
    if args.url:
        overrides.append(f"rollout.sglang.urls=[{args.url}]")
    cfg = load_config(os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"), overrides)
    work = tempfile.mkdtemp(prefix="bench_rollout_")
    model_dir = build(os.path.join(work, "model"), cfg, seed=0)
    t0 = time.perf_counter()
    engine = SGLangEngine(cfg.rollout, cfg.model, work_dir=os.path.join(work, "sglang"), tokenizer_path=model_dir,
                          eos_token_id=2, model_path=model_dir)  # fmt: skip
    startup = time.perf_counter() - t0
    try:
        from safetensors.torch import load_file

        state = load_file(os.path.join(model_dir, "model.safetensors"))
        engine.update_weights(state, 0)
        run(engine, state, args, startup)
    finally:
        engine.shutdown()


def run(engine, state, args, startup: float) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, 50, (12,), generator=gen).tolist() for _ in range(args.prompts)]
    params = SamplingParams(n=args.n, max_new_tokens=args.new, temperature=1.0)
    extra = {"ignore_eos": True}
    bodies = [engine._body(p, params, g, extra) for g, p in enumerate(prompts)]
    url = engine.urls[0]
    expected = args.prompts * args.n * args.new
    engine.generate(prompts[:2], params, extra)  # warm-up
    direct(url, bodies[:2], 2)
    drivers = {
        "ours": lambda: sum(len(s.response_ids) for s in engine.generate(prompts, params, extra)),
        "direct": lambda: direct(url, bodies, min(engine.cfg.max_concurrency, len(bodies))),
    }
    if args.aa:
        drivers["direct-again"] = drivers["direct"]
    if args.batch:
        drivers["direct-batch"] = lambda: direct_batch(url, bodies)
    times: dict[str, list[float]] = {name: [] for name in drivers}
    load_before = os.getloadavg()[0]
    for rep in range(args.reps):
        order = list(drivers) if rep % 2 == 0 else list(reversed(drivers))  # A/B, then B/A: no driver always first
        for name in order:
            start = time.perf_counter()
            tokens = drivers[name]()
            times[name].append(time.perf_counter() - start)
            assert tokens == expected, (name, tokens, expected)
    load_after = os.getloadavg()[0]
    tps = {k: expected / statistics.median(v) for k, v in times.items()}
    paired = {k: [d / o for d, o in zip(v, times["ours"])] for k, v in times.items() if k != "ours"}

    sync: dict[str, float] = {}
    version = 1
    for kind in ("disk", "tensor", "distributed"):
        engine.set_transport(kind)
        seconds = []
        for _ in range(args.sync_reps):
            engine.update_weights(state, version)
            seconds.append(engine.last_sync_s)
            version += 1
        sync[kind] = statistics.median(seconds)
    engine.set_transport("disk")

    machine = f"{platform.node()} ({os.cpu_count()} CPUs, {'GPU' if torch.cuda.is_available() else 'CPU only'})"
    print(f"machine: {machine}; load average {load_before:.1f} -> {load_after:.1f}; server start-up {startup:.1f} s; "
          f"server OMP threads {os.environ.get('OMP_NUM_THREADS', 'default')}; "
          f"workload {args.prompts} prompts x n={args.n} x {args.new} new tokens = {expected} tokens, "
          f"{args.reps} alternating reps, medians")  # fmt: skip
    print(f"{'driver':<14}{'median s':>10}{'min s':>10}{'max s':>10}{'tokens/s':>11}")
    for name, v in times.items():
        print(f"{name:<14}{statistics.median(v):>10.3f}{min(v):>10.3f}{max(v):>10.3f}{tps[name]:>11.1f}")
    print("per-rep ratio ours tokens/s / direct tokens/s: " + " ".join(f"{r:.2f}" for r in paired["direct"]))
    params_mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    print(f"weight sync ({params_mb:.2f} MB, median of {args.sync_reps}, post-sync check off):")
    for kind, s in sync.items():
        print(f"  {kind:<12}{s:>8.3f} s")
    print(f"weight_sync_tensor_vs_disk ratio={sync['tensor'] / sync['disk']:.3f} goal<=1.0")
    print(f"weight_sync_distributed_vs_disk ratio={sync['distributed'] / sync['disk']:.3f} goal<=1.0")
    if "direct-batch" in times:  # > 1: one batched request would beat one request per prompt
        batch = statistics.median(times["direct"]) / statistics.median(times["direct-batch"])
        print(f"direct_batch_vs_direct ratio={batch:.3f} goal<=1.0")  # <= 1: per-prompt requests are right
    if "direct-again" in paired:  # the same driver twice: how far this machine's noise moves the ratio
        print(f"noise_floor_direct_vs_direct ratio={statistics.median(paired['direct-again']):.3f} goal=1.0")
    print(f"rollout_client_throughput ratio={statistics.median(paired['direct']):.3f} goal>=0.9")


if __name__ == "__main__":
    main()
