"""The local engine in a process of its own (rollout.local_process): generation on its own core and GIL.

With rollout.async_steps=1 the next step's rollout runs while this step trains. In a thread (the plain local
engine) both sides are Python-bound at tiny-model sizes and take turns on one GIL, so the overlap buys
little (tools/bench_async_rollout.py --engine local). Here a spawned child runs LocalEngine. The parent keeps
the rollout model's weights in shared memory, and the child's model uses those very tensors as its
parameters: a weight sync is the parent's in-place copy into them (nothing pickled, no second copy), and a
request is a few token lists through a pipe. The trainer changes the weights only while no rollout is in
flight (sync_weights waits for the rollout ahead), so the child never reads a half-written sync.
"""

from __future__ import annotations

import contextlib
import signal
import traceback

import torch
import torch.multiprocessing as mp

from megatron_sapo.config import ModelConfig
from megatron_sapo.rollout.base import HFWeights, Sample, SamplingParams
from megatron_sapo.rollout.local import LocalEngine


def _serve(conn, model_cfg: ModelConfig, eos_token_id: int, pad_token_id: int, weights: dict, threads: int):
    """The child: a LocalEngine on the shared weights, answering ("generate", prompts, params, version)
    requests until ("stop",) or the parent's end of the pipe closes."""
    # SLURM signals every process of a job step, a terminal's Ctrl-C the whole foreground group: the trainer
    # decides (a graceful stop still needs rollouts), and its exit closes the pipe, which ends this loop.
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        engine = LocalEngine(model_cfg, eos_token_id, pad_token_id, weights=weights)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request[0] == "stop":
            return
        _, prompts, params, version = request
        engine.weight_version = version  # the parent synced that version into the shared weights
        try:
            conn.send(("ok", engine.generate(prompts, params)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class LocalProcessEngine:
    """LocalEngine's interface; the generation runs in a spawned child process."""

    def __init__(self, model_cfg: ModelConfig, eos_token_id: int, pad_token_id: int, threads: int = 0):
        # The parent's LocalEngine only holds the weights (moved to shared memory) and does the syncs; its
        # generate() is never called here.
        self._weights = LocalEngine(model_cfg, eos_token_id, pad_token_id)
        self._weights.model.share_memory()
        ctx = mp.get_context("spawn")  # a fork would copy megatron's and gloo's state and threads
        self._conn, child_conn = ctx.Pipe()
        args = (child_conn, model_cfg, eos_token_id, pad_token_id, self._weights.model.state_dict(),
                threads or torch.get_num_threads())  # fmt: skip
        self._proc = ctx.Process(target=_serve, args=args, name="megatron-sapo-rollout", daemon=True)
        self._proc.start()
        child_conn.close()
        self._receive("start-up")

    @property
    def weight_version(self) -> int:
        return self._weights.weight_version

    def update_weights(self, weights: HFWeights, version: int) -> None:
        self._weights.update_weights(weights, version)  # in place, into the tensors the child generates with

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        try:
            self._conn.send(("generate", prompts, params, self.weight_version))
        except (BrokenPipeError, ConnectionResetError):
            self._died("generate")
        return self._receive("generate")

    def health(self) -> bool:
        return self._proc.is_alive()

    def shutdown(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):  # it may be exiting already
                self._conn.send(("stop",))
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def _receive(self, what: str):
        try:
            kind, value = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self._died(what)
        if kind == "error":
            raise RuntimeError(f"the local rollout process failed during {what}:\n{value}")
        return value

    def _died(self, what: str):
        self._proc.join(timeout=5)
        raise RuntimeError(f"the local rollout process died during {what} (exit code {self._proc.exitcode})")
