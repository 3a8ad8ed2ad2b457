"""A killed server is detected, restarted with the current weights, and the rollout retried: every prompt
gets exactly n samples, none duplicated or lost. (Runs last: it costs one server start-up.)"""

from __future__ import annotations

import threading
import time

from megatron_sapo.rollout.base import SamplingParams

from .conftest import kill_group
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
