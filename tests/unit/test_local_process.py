"""rollout.local_process: the local engine in a spawned child, on the parent's shared-memory weights."""

import os
import signal
import time

import pytest
import torch

from megatron_sapo.config import load_config
from megatron_sapo.rollout.base import SamplingParams
from megatron_sapo.rollout.local import LocalEngine
from megatron_sapo.rollout.local_process import LocalProcessEngine

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 4, 4]]


@pytest.fixture(scope="module")
def engines():
    cfg = load_config(None, ["model.vocab_size=64"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        local = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    child = LocalProcessEngine(cfg.model, eos_token_id=2, pad_token_id=0, threads=1)
    yield local, child
    child.shutdown()


def test_the_child_generates_what_the_local_engine_does_and_follows_every_sync(engines):
    local, child = engines
    params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0, seed=3)
    weights = {name: value.clone() for name, value in local.model.state_dict().items()}  # a full HF state dict
    seen = []
    for version, scale in ((1, 1.0), (2, 1.7)):  # the second sync must reach the child's model too
        update = {name: value * scale for name, value in weights.items()}
        local.update_weights(update, version)
        child.update_weights(update, version)
        want, got = local.generate(PROMPTS, params), child.generate(PROMPTS, params)
        assert [s.response_ids for s in got] == [s.response_ids for s in want]
        assert [s.rollout_log_probs for s in got] == [s.rollout_log_probs for s in want]
        assert {s.weight_version for s in got} == {version}
        seen.append([s.rollout_log_probs for s in got])
    assert seen[0] != seen[1]  # other weights, other log-probs: the sync took effect in the child


def test_a_failure_in_the_child_is_raised_with_its_traceback_and_the_child_lives_on(engines):
    _, child = engines
    with pytest.raises(RuntimeError, match=r"failed during generate:(.|\n)*IndexError"):
        child.generate([[1, 99]], SamplingParams(n=1, max_new_tokens=2))  # token 99 outside the vocabulary of 64
    assert child.health()
    assert len(child.generate([[1, 5]], SamplingParams(n=2, max_new_tokens=2))) == 2


def test_the_child_ignores_the_stop_signals_that_the_trainer_handles(engines):
    """SLURM signals every process of a job step (and Ctrl-C the whole foreground group): the child must
    keep serving until the trainer, which stops gracefully, ends it."""
    _, child = engines
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(child._proc.pid, signum)
    time.sleep(0.5)  # a default disposition would have ended the process by now
    assert child.health()
    assert len(child.generate([[1, 5]], SamplingParams(n=2, max_new_tokens=2))) == 2


def test_a_dead_child_is_reported_not_waited_on():
    cfg = load_config(None, ["model.vocab_size=64"])
    child = LocalProcessEngine(cfg.model, eos_token_id=2, pad_token_id=0, threads=1)
    child._proc.kill()
    child._proc.join()
    assert not child.health()
    with pytest.raises(RuntimeError, match="local rollout process died during generate"):
        child.generate([[1, 5]], SamplingParams(n=1, max_new_tokens=2))
    child.shutdown()


def test_the_rollout_child_counts_in_the_automatic_thread_split(monkeypatch):
    from megatron_sapo.megatron import parallel

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 4)
    assert parallel.cpu_threads_per_process(1) == 4
    assert parallel.cpu_threads_per_process(1, rollout_process=True) == 2  # trainer and child: 2 cores each
    assert parallel.cpu_threads_per_process(2, rollout_process=True) == 1  # 2 ranks and the child on 4 cores
    assert parallel.cpu_threads_per_process(1, threads=3, rollout_process=True) == 3  # parallel.cpu_threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert parallel.cpu_threads_per_process(1, rollout_process=True) == torch.get_num_threads()
