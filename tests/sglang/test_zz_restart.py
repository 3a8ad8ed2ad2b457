"""A killed server is detected, restarted with the current weights, and the rollout retried: every prompt
gets exactly n samples, none duplicated or lost; with every transport the restarted server serves the current
weights. (Runs last: each test costs one server start-up.)"""

from __future__ import annotations

import threading
import time

import pytest

from megatron_sapo.rollout.base import SamplingParams

from .conftest import kill_group, perturbed
from .test_generate import LOGPROB_TOL


def test_killed_server_restarted_and_rollout_retried(engine, tiny, initial_state):
    engine.set_transport("disk")
    engine.update_weights(initial_state, 5)
    old_pid = engine.pids[0]
    prompts = [[1, 5 + i, 6 + i, 7 + i] for i in range(16)]
    params = SamplingParams(n=4, max_new_tokens=50, temperature=1.0)
    box = {}

    def rollout():
        try:
            box["samples"] = engine.generate(prompts, params, {"ignore_eos": True})
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    thread = threading.Thread(target=rollout)
    thread.start()
    time.sleep(0.5)  # requests in flight (the whole rollout takes several seconds)
    kill_group(old_pid)
    thread.join(timeout=900)
    assert not thread.is_alive()
    assert "error" not in box, box.get("error")
    samples = box["samples"]
    assert engine.restarts == 1 and engine.pids[0] != old_pid and engine.health()
    assert len(samples) == len(prompts) * params.n
    assert [s.group for s in samples] == [g for g in range(len(prompts)) for _ in range(params.n)]
    assert all(s.prompt_ids == prompts[s.group] and len(s.response_ids) == 50 for s in samples)
    assert all(s.weight_version == 5 for s in samples)  # the restarted server serves the synced weights
    assert engine.check_log_probs(initial_state)["sync/logprob_abs_diff_max"] < LOGPROB_TOL


@pytest.mark.parametrize("transport,version", [("tensor", 41), ("distributed", 42)])
def test_restarted_server_gets_current_weights(engine, tiny, initial_state, transport, version, monkeypatch):
    """tensor / distributed: a restarted server starts from the launch checkpoint, so the engine must push the
    current weights again (disk restarts from the newest checkpoint folder, tested above)."""
    monkeypatch.setattr(engine, "restarts", 0)  # each test gets its own restart budget (max_restarts)
    engine.set_transport(transport)
    new_state = perturbed(initial_state, seed=version)
    engine.update_weights(new_state, version)
    old_pid = engine.pids[0]
    kill_group(old_pid)
    while engine.servers[0].alive():
        time.sleep(0.1)
    prompts = [[1, 5 + i, 6 + i] for i in range(4)]
    samples = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, temperature=1.0))
    assert engine.restarts == 1 and engine.pids[0] != old_pid
    assert len(samples) == 8 and all(s.weight_version == version for s in samples)
    # served log-probs equal the trainer's for the new weights, not the launch checkpoint's
    assert engine.check_log_probs(new_state)["sync/logprob_abs_diff_max"] < LOGPROB_TOL
    assert engine.check_log_probs(initial_state)["sync/logprob_abs_diff_max"] > 1e-2
    engine.set_transport("disk")
    engine.update_weights(initial_state, 0)  # back to the launch weights for anything that runs after
