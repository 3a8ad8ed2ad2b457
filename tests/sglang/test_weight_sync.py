"""Each transport changes the served weights, and the served log-probs then match the trainer's new weights."""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.rollout.base import SamplingParams

from .conftest import perturbed
from .test_generate import LOGPROB_TOL, hf_log_probs, hf_model

PROMPTS = [[1, 5, 6, 7, 8], [1, 22, 23, 24]]
GREEDY = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)


def served(engine):
    return engine.generate(PROMPTS, GREEDY, {"ignore_eos": True})


@pytest.mark.parametrize("transport,version", [("disk", 11), ("tensor", 12), ("distributed", 13)])
def test_transport_changes_served_weights(engine, tiny, initial_state, transport, version):
    cfg, _ = tiny
    engine.set_transport(transport)
    before = served(engine)
    new_state = perturbed(initial_state, seed=version)
    engine.update_weights(new_state, version)  # includes the post-sync check (verify_tol)
    print(f"{transport}: sync {engine.last_sync_s:.2f} s, post-sync check {engine.last_check}")
    assert engine.last_check["sync/logprob_abs_diff_max"] < LOGPROB_TOL
    after = served(engine)
    assert all(s.weight_version == version for s in after)
    model = hf_model(cfg, new_state)
    changed = 0.0
    for old, new in zip(before, after):
        seq = new.prompt_ids + new.response_ids
        ref = hf_log_probs(model, seq)[len(new.prompt_ids) - 1 :]
        assert (torch.tensor(new.rollout_log_probs) - ref).abs().max().item() < LOGPROB_TOL
        n = min(len(old.rollout_log_probs), len(new.rollout_log_probs))
        changed = max(changed, (torch.tensor(old.rollout_log_probs[:n]) - torch.tensor(new.rollout_log_probs[:n]))
                      .abs().max().item())  # fmt: skip
    assert changed > 1e-2  # the served policy really moved
    # back to the launch weights (same transport), as the other tests expect them
    engine.update_weights(initial_state, 0)
    restored = served(engine)
    assert [s.response_ids for s in restored] == [s.response_ids for s in before]


def test_post_sync_check_catches_wrong_weights(engine, tiny, initial_state):
    """The check compares against the trainer's weights: served weights that differ must fail it."""
    from megatron_sapo.rollout.sglang_engine import LogProbMismatch

    engine.set_transport("disk")
    engine.update_weights(initial_state, 0)
    metrics = engine.check_log_probs(perturbed(initial_state, seed=99))  # trainer 'has' other weights
    assert metrics["sync/logprob_abs_diff_max"] > engine.cfg.verify_tol
    with pytest.raises(LogProbMismatch, match="verify_tol"):
        engine.reference_fn = lambda tokens: [[0.0] * (len(t) - 1) for t in tokens]
        try:
            engine.update_weights(initial_state, 0)
        finally:
            engine.reference_fn = None
    engine.update_weights(initial_state, 0)
