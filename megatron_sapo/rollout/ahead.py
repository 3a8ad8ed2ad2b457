"""Rollouts generated ahead of training (rollout.async_steps=1): one in flight at a time, in a thread.

The thread runs the trainer's own rollout function (engine.generate, rewards); the trainer keeps training
meanwhile, and waits for it before the rollout engine's weights change or a checkpoint is written. With
SGLang the thread mostly waits on HTTP, so the servers generate while the trainer's GPUs train; the local
engine samples with its own generator, so the overlap leaves the trainer's random streams alone. Torch
function modes are per thread: the thread runs without compat.py's device-argument mode, which generation
and rewards do not need (the trainer's thread keeps it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class RolloutAhead:
    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None  # started with the first rollout ahead
        self._future: Future | None = None
        self._ready = None  # a finished result, e.g. restored from a checkpoint

    def start(self, fn: Callable, *args) -> None:
        if self._future is not None or self._ready is not None:
            raise RuntimeError("a rollout ahead is already pending: take() it first")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self._future = self._pool.submit(fn, *args)

    def restore(self, result) -> None:
        """A finished rollout (e.g. from a checkpoint) for the next take()."""
        if self._future is not None:
            raise RuntimeError("a rollout ahead is running: cannot restore another")
        self._ready = result

    def wait(self) -> float:
        """Block until the pending rollout (if any) has finished; returns the seconds waited. A rollout that
        raised re-raises here, in the trainer's thread."""
        start = time.perf_counter()
        if self._future is not None:
            future, self._future = self._future, None
            self._ready = future.result()
        return time.perf_counter() - start

    def peek(self):
        """The finished result that take() would return (None if none); call wait() first."""
        return self._ready

    def take(self):
        """The pending rollout's result (waiting for it), or None when none was started or restored."""
        self.wait()
        result, self._ready = self._ready, None
        return result

    def close(self) -> None:
        """Wait for a running rollout (a thread cannot be cancelled) and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
