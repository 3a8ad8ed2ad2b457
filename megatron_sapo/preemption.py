"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`, the time-limit warning).

The handler only records the signal (async-signal-safe: one attribute store). The trainer reads it at step
boundaries, where every rank agrees on it with one tiny all_reduce (MAX), writes a complete checkpoint of that
step and leaves fit(); the CLI then exits with EXIT_CODE. A signal that arrives while a checkpoint is being
written is only recorded, so the write completes.

SLURM signals every process of a job step, not only the task. The helper processes see it too: megatron's
forked checkpoint writers inherit the handlers; its write-results Manager, a spawned process that a signal
would kill (failing the next save), is never started (checkpoint._results_queue_without_a_manager); the local
rollout child (rollout.local_process) ignores both signals and ends with the trainer.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

# EX_TEMPFAIL (sysexits.h, "temporary failure; the user is invited to retry"): the run stopped early on a
# signal after a complete checkpoint, and a rerun of the same command resumes it. Not 0, so a job script can
# tell "stopped, requeue me" from "finished"; not 128+signal (what a shell reports for a process the signal
# killed), because this exit is clean and the checkpoint is complete; not 1 or 2 (a crash, bad input).
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing a complete checkpoint of `step`; rerun to resume."""

    exit_code = EXIT_CODE

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} (checkpoint complete)")


class StopSignals:
    """Context manager: while active, SIGTERM and SIGUSR1 only set `received` (their number); the previous
    handlers come back on exit. Disabled (or off the main thread, where Python cannot install handlers) it
    installs nothing and `agreed()` is only the collective."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received = 0
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        self._previous.clear()

    def agreed(self) -> int:
        """The signal any rank received (the largest number if several; 0: none), the same on every rank. A
        collective when torch.distributed runs with several ranks: every rank calls it at the same point."""
        flag = self.received
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            box = torch.tensor([flag], dtype=torch.int64, device=device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            flag = int(box.item())
        return flag
