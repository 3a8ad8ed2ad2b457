"""Scoring a rollout batch concurrently, with a bounded pool; failures are counted, never fatal.

    scores = score_batch(tasks, completions, samples, max_workers=8)
    scores.rewards        # list[float]: 0.0 for a failed item, NaN where a verifier returned NaN
    scores.failed, scores.nan   # indices; scores.errors[i] = "ExcType: message" for failed items
    scores.metrics()      # flat numbers for metrics.jsonl (reward/failures, reward/nan, per-task means)

Workers are threads: code rewards spend their time waiting on sandbox processes, and the others are short.
A verifier that exceeds `timeout_s` is recorded as a failure (its thread cannot be killed, so it finishes in
the background; math-verify runs without its SIGALRM timeout off the main thread).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from megatron_sapo.rewards.registry import compute_reward

log = logging.getLogger(__name__)


@dataclass
class BatchScores:
    rewards: list[float]
    tasks: list[str]
    errors: dict[int, str] = field(default_factory=dict)  # index -> "ExcType: message"
    nan: list[int] = field(default_factory=list)  # indices whose verifier returned NaN
    seconds: float = 0.0

    @property
    def failed(self) -> list[int]:
        return sorted(self.errors)

    def metrics(self) -> dict[str, float]:
        """reward/failures, reward/nan, reward/time_s, and reward/{task}/mean over the finite rewards."""
        out = {
            "reward/failures": float(len(self.errors)),
            "reward/nan": float(len(self.nan)),
            "reward/time_s": self.seconds,
        }
        by_task: dict[str, list[float]] = {}
        for task, r in zip(self.tasks, self.rewards):
            if not math.isnan(r):
                by_task.setdefault(task, []).append(r)
        for task, values in sorted(by_task.items()):
            out[f"reward/{task}/mean"] = sum(values) / len(values)
        return out


def score_batch(
    tasks: list[str],
    completions: list[str],
    samples: list[dict],
    max_workers: int = 8,
    timeout_s: float | None = 120.0,
) -> BatchScores:
    """Score every (task, completion, sample) with compute_reward, at most max_workers at a time."""
    if not (len(tasks) == len(completions) == len(samples)):
        raise ValueError(
            f"score_batch: tasks ({len(tasks)}), completions ({len(completions)}) and samples "
            f"({len(samples)}) must have the same length"
        )
    if max_workers < 1:
        raise ValueError(f"score_batch: max_workers must be >= 1, got {max_workers}")
    start = time.perf_counter()
    result = BatchScores(rewards=[0.0] * len(tasks), tasks=list(tasks))
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")
    try:
        futures = {
            pool.submit(compute_reward, t, c, s): i for i, (t, c, s) in enumerate(zip(tasks, completions, samples))
        }
        done, pending = wait(futures, timeout=timeout_s)
        for fut in pending:
            fut.cancel()
            result.errors[futures[fut]] = f"TimeoutError: the verifier took longer than {timeout_s} s"
        for fut in done:
            i = futures[fut]
            exc = fut.exception()
            if exc is not None:
                result.errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            value = fut.result()
            result.rewards[i] = value
            if math.isnan(value):
                result.nan.append(i)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    result.nan.sort()
    for i in result.failed:
        log.warning("reward failed (task %r, item %d): %s", tasks[i], i, result.errors[i])
    if result.nan:
        log.warning("reward is NaN for %d item(s) (tasks %s)", len(result.nan), sorted({tasks[i] for i in result.nan}))
    result.seconds = time.perf_counter() - start
    return result
