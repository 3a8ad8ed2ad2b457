"""`megatron-sapo eval`: score a policy on prompt datasets, without training.

    megatron-sapo eval examples/tiny_moe_cpu.yaml                         # the run folder's newest checkpoint
    megatron-sapo eval CONFIG --checkpoint RUN/checkpoints/step_40 --data test.jsonl --n 4 --temperature 1
    megatron-sapo eval CONFIG --hf HF_DIR                                 # an HF folder, loaded as it is

Weights, first found: --hf (an HF folder: the rollout engine loads or serves it directly, one process, no
Megatron), --checkpoint, the run folder's newest complete checkpoint, model.hf_path. A Megatron checkpoint is
loaded by the Megatron engine at the config's layout (as many processes as it needs, any saved layout) and
streamed to the rollout engine exactly like a training weight sync.

Prompts: every row of data.paths (or --data), once, in file order (--limit N: the first N of each file); with no
files, a held-out draw of the synthetic task (another seed than training). Rank 0 generates --n samples per
prompt (--temperature 0: greedy), scores them with each row's task reward and writes <out>/samples.jsonl (one
line per sample) and <out>/summary.json. Per task and overall: reward_mean, pass@1 and pass@n (the unbiased
estimator over the n samples; a sample is correct when its reward >= --correct-at), response_len_mean,
stop_frac, and reward failures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from megatron_sapo.config import Config
from megatron_sapo.rollout.base import Sample, SamplingParams

HELD_OUT_SEED_OFFSET = 7919  # synthetic eval rows: not the training draw
DEFAULT_SYNTHETIC_ROWS = 128


@dataclasses.dataclass
class EvalOptions:
    checkpoint: str | None = None
    hf: str | None = None
    data: list[str] | None = None
    n: int = 1
    temperature: float = 0.0
    max_new_tokens: int | None = None
    limit: int | None = None
    correct_at: float = 1.0
    out: str | None = None
    batch_prompts: int = 32  # prompts per generate() call (bounds the local engine's memory)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def summarize(rows: list[dict], n: int, correct_at: float) -> dict[str, dict[str, float]]:
    """Per task and "all": metrics over the scored sample rows (n consecutive rows per prompt)."""
    by_task: dict[str, list[list[dict]]] = {}
    for start in range(0, len(rows), n):
        group = rows[start : start + n]
        by_task.setdefault(group[0]["task"], []).append(group)
    by_task["all"] = [g for task, groups in list(by_task.items()) for g in groups]
    out = {}
    for task, groups in by_task.items():
        samples = [r for g in groups for r in g]
        finite = [r["reward"] for r in samples if not math.isnan(r["reward"])]
        correct = [sum(not math.isnan(r["reward"]) and r["reward"] >= correct_at for r in g) for g in groups]
        metrics = {
            "prompts": float(len(groups)),
            "samples": float(len(samples)),
            "reward_mean": sum(finite) / len(finite) if finite else float("nan"),
            "pass@1": sum(pass_at_k(n, c, 1) for c in correct) / len(groups),
            "response_len_mean": sum(r["response_len"] for r in samples) / len(samples),
            "stop_frac": sum(r["finish_reason"] == "stop" for r in samples) / len(samples),
            "reward_failures": float(sum(r["reward_error"] is not None for r in samples)),
        }
        if n > 1:
            metrics[f"pass@{n}"] = sum(pass_at_k(n, c, n) for c in correct) / len(groups)
        out[task] = metrics
    return out


def _eval_prompts(cfg: Config, tokenizer, opts: EvalOptions) -> list:
    from megatron_sapo.data.prompts import build_prompt_source

    paths = list(opts.data) if opts.data else list(cfg.data.paths)
    source = build_prompt_source(
        paths, tokenizer, max_prompt_len=cfg.data.max_prompt_len, seed=cfg.train.seed + HELD_OUT_SEED_OFFSET,
        prompt_key=cfg.data.prompt_key, synthetic_task=cfg.data.synthetic_task,
        synthetic_size=opts.limit or DEFAULT_SYNTHETIC_ROWS, image_tokens=cfg.data.image_tokens,
    )  # fmt: skip
    return [p for per_source in source.prompts for p in per_source[: opts.limit or None]]


def _weights_source(cfg: Config, opts: EvalOptions) -> tuple[str, str]:
    """("hf", folder) or ("checkpoint", folder): what to evaluate, or a clear error."""
    from megatron_sapo.run_state import find_resume_checkpoint, require_complete

    if opts.hf and opts.checkpoint:
        raise ValueError("give one of --hf and --checkpoint, not both")
    if opts.hf:
        return "hf", opts.hf
    if opts.checkpoint:
        return "checkpoint", require_complete(opts.checkpoint, "--checkpoint")
    if (newest := find_resume_checkpoint(cfg)) is not None:
        return "checkpoint", newest
    if cfg.model.hf_path:
        return "hf", cfg.model.hf_path
    raise FileNotFoundError(
        f"nothing to evaluate: no complete checkpoint under {cfg.run.dir}/checkpoints and no --checkpoint, --hf "
        "or model.hf_path"
    )


def _load_policy(cfg: Config, kind: str, path: str, rollout) -> int:
    """Put the weights into the rollout engine (rank 0); returns their version (the checkpoint's step)."""
    if kind == "hf":
        from megatron_sapo.rollout.weights import load_hf_state

        if cfg.rollout.engine == "local":
            rollout.update_weights(load_hf_state(path), 0)
        return rollout.weight_version  # SGLang serves the folder it was launched from
    from megatron_sapo.megatron.engine import MegatronEngine

    step = int(m.group(1)) if (m := re.search(r"step_(\d+)$", path.rstrip("/"))) else 0
    engine = MegatronEngine(cfg)
    try:
        engine.load_weights(path)
        # rank 0 owns the rollout engine; the other ranks send their shards
        engine.export_hf(cfg.rollout.sglang.bucket_mb, lambda buckets: rollout.update_weights(buckets, step))
    finally:
        engine.shutdown()
    return step


def evaluate(cfg: Config, opts: EvalOptions) -> dict[str, dict[str, float]] | None:
    """Run the evaluation; returns the summary on rank 0 (None on the other ranks)."""
    from megatron_sapo.trainer import build_rollout_engine, load_tokenizer

    if opts.n < 1:
        raise ValueError(f"--n must be >= 1, got {opts.n}")
    kind, path = _weights_source(cfg, opts)
    if kind == "hf":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("eval of an HF folder runs as one process (no Megatron engine): run it plainly")
        cfg.model.hf_path = path  # the tokenizer (unless data.tokenizer) and a launched SGLang server use it
    rank0 = int(os.environ.get("RANK", "0")) == 0
    rollout, prompts, tokenizer = None, [], None
    if rank0:  # data first: bad input fails before any model is built
        tokenizer = load_tokenizer(cfg)
        prompts = _eval_prompts(cfg, tokenizer, opts)
        rollout = build_rollout_engine(cfg, tokenizer)
    try:
        version = _load_policy(cfg, kind, path, rollout)
        if not rank0:
            return None
        rows = _generate_and_score(cfg, opts, prompts, tokenizer, rollout, version)
    finally:
        if rollout is not None:
            rollout.shutdown()
    summary = summarize(rows, opts.n, opts.correct_at)
    _write(opts.out or os.path.join(cfg.run.dir, "eval", os.path.basename(path.rstrip("/"))), rows, summary, path)
    return summary


def _generate_and_score(cfg, opts: EvalOptions, prompts, tokenizer, rollout, version: int) -> list[dict]:
    from megatron_sapo.rewards.pool import score_batch

    params = SamplingParams(n=opts.n, max_new_tokens=opts.max_new_tokens or cfg.rollout.max_new_tokens,
                            temperature=opts.temperature, top_p=cfg.rollout.top_p, seed=cfg.train.seed)  # fmt: skip
    rows: list[dict] = []
    for start in range(0, len(prompts), opts.batch_prompts):
        chunk = prompts[start : start + opts.batch_prompts]
        samples: list[Sample] = rollout.generate([p.ids for p in chunk], params)
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        owners = [chunk[s.group] for s in samples]
        scores = score_batch([p.task for p in owners], texts, [p.sample for p in owners])
        for i, (s, p, text) in enumerate(zip(samples, owners, texts)):
            rows.append({
                "source": p.source, "index": p.index, "task": p.task, "prompt": p.text, "response": text,
                "reward": scores.rewards[i], "reward_error": scores.errors.get(i), "finish_reason": s.finish_reason,
                "response_len": len(s.response_ids), "weight_version": version,
            })  # fmt: skip
    return rows


def _write(out_dir: str, rows: list[dict], summary: dict, weights: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"weights": weights, "metrics": summary}, f, indent=2)
    for task, m in summary.items():
        extra = "  ".join(f"{k} {v:.4g}" for k, v in m.items() if k not in ("prompts", "samples"))
        print(f"eval {task}: {int(m['prompts'])} prompts x {int(m['samples'] // max(m['prompts'], 1))}  {extra}")
    print(f"wrote {out_dir}/samples.jsonl and summary.json")
