"""rollout/ahead.py: one rollout in flight in a thread; its result (or its exception) reaches the trainer's
thread once; a restored result is handed out like a generated one."""

import threading

import pytest

from megatron_sapo.rollout.ahead import RolloutAhead


def test_runs_in_another_thread_and_hands_the_result_out_once():
    ahead = RolloutAhead()
    release = threading.Event()
    seen = {}

    def rollout(step):
        seen["thread"] = threading.current_thread() is not threading.main_thread()
        release.wait(timeout=10)
        return ("samples", step)

    ahead.start(rollout, 3)
    with pytest.raises(RuntimeError, match="already pending"):
        ahead.start(rollout, 4)
    release.set()
    assert ahead.wait() >= 0.0 and ahead.peek() == ("samples", 3)
    assert ahead.take() == ("samples", 3)
    assert ahead.take() is None and seen["thread"]
    ahead.close()


def test_an_exception_in_the_rollout_reraises_in_the_caller():
    ahead = RolloutAhead()

    def broken():
        raise ValueError("server gone")

    ahead.start(broken)
    with pytest.raises(ValueError, match="server gone"):
        ahead.take()
    ahead.start(lambda: "next")  # the failed one is cleared
    assert ahead.take() == "next"
    ahead.close()


def test_a_restored_result_is_taken_first_and_blocks_a_new_start():
    ahead = RolloutAhead()
    ahead.restore(("from checkpoint", 5))
    with pytest.raises(RuntimeError, match="already pending"):
        ahead.start(lambda: None)
    assert ahead.take() == ("from checkpoint", 5)
    assert ahead.take() is None
