"""Generation against the real server: n samples per prompt, log-probs, finish reasons, routed experts."""

from __future__ import annotations

import torch

from megatron_sapo.rollout.base import SamplingParams

# float32 server vs float32 HF model on the same weights (measured max |diff| ~1e-6 on this machine)
LOGPROB_TOL = 1e-4


def hf_model(cfg, state):
    from megatron_sapo.rollout.local import build_hf_model

    model = build_hf_model(cfg.model, 2)
    model.load_state_dict(state)
    return model


def hf_log_probs(model, seq: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float() / temperature
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)


def test_n_samples_per_prompt(engine, tiny):
    cfg, _ = tiny
    prompts = [[1, 5, 6, 7, 8], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35]]
    samples = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0))
    assert len(samples) == 12
    assert [s.group for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    for s in samples:
        assert s.prompt_ids == prompts[s.group]
        assert 1 <= len(s.response_ids) <= 12 and len(s.rollout_log_probs) == len(s.response_ids)
        assert all(lp <= 0.0 for lp in s.rollout_log_probs)
        assert s.weight_version == engine.weight_version == 0
        assert s.finish_reason in ("stop", "length")
        assert (s.finish_reason == "stop") == (s.response_ids[-1] == 2)  # EOS is part of the response
        assert s.finish_reason == "stop" or len(s.response_ids) == 12
    for g in range(3):  # sampling at temperature 1 on a random model: the n samples of a group differ
        group = [tuple(s.response_ids) for s in samples if s.group == g]
        assert len(set(group)) > 1


def test_greedy_log_probs_equal_trainer(engine, tiny, initial_state):
    cfg, _ = tiny
    model = hf_model(cfg, initial_state)
    prompts = [[1, 5, 6, 7, 8], [1, 40, 41, 42]]
    samples = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=16, temperature=0.0),
                              {"ignore_eos": True})  # fmt: skip
    worst = 0.0
    for s in samples:
        seq = s.prompt_ids + s.response_ids
        ref = hf_log_probs(model, seq)[len(s.prompt_ids) - 1 :]
        served = torch.tensor(s.rollout_log_probs)
        assert len(s.response_ids) == 16
        # greedy: every served token is the trainer's argmax
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(s.prompt_ids) - 1 : -1]
        assert logits.argmax(-1).tolist() == s.response_ids
        worst = max(worst, (served - ref).abs().max().item())
    print(f"greedy rollout vs trainer log-probs: max |diff| = {worst:.3g} (tolerance {LOGPROB_TOL})")
    assert worst < LOGPROB_TOL


def test_sampled_log_probs_are_at_the_rollout_temperature(engine, tiny, initial_state):
    cfg, _ = tiny
    model = hf_model(cfg, initial_state)
    samples = engine.generate([[1, 9, 10, 11]], SamplingParams(n=3, max_new_tokens=10, temperature=0.7))
    for s in samples:
        seq = s.prompt_ids + s.response_ids
        ref = hf_log_probs(model, seq, temperature=0.7)[len(s.prompt_ids) - 1 :]
        assert (torch.tensor(s.rollout_log_probs) - ref).abs().max().item() < LOGPROB_TOL
        at_t1 = hf_log_probs(model, seq)[len(s.prompt_ids) - 1 :]
        assert (torch.tensor(s.rollout_log_probs) - at_t1).abs().max().item() > 1e-3  # not the T=1 values


def test_post_sync_check_metrics(engine):
    check = engine.last_check
    assert check["sync/tokens_checked"] > 0
    assert check["sync/logprob_abs_diff_max"] < LOGPROB_TOL


def test_progress_bar_advances_per_group(engine, monkeypatch):
    import contextlib

    from megatron_sapo.rollout import sglang_engine

    calls = []

    class Bar:
        n = 0

        def update(self, k=1):
            self.n += k

    @contextlib.contextmanager
    def fake_bar(total, desc, enabled=True, unit="it"):
        bar = Bar()
        calls.append((total, enabled, bar))
        yield bar

    monkeypatch.setattr(sglang_engine, "progress_bar", fake_bar)
    prompts = [[1, 5, 6], [1, 7, 8], [1, 9, 10]]
    engine.generate(prompts, SamplingParams(n=2, max_new_tokens=4, temperature=1.0))
    monkeypatch.setattr(engine, "progress", False)  # logging.progress=false reaches the bar
    engine.generate(prompts[:1], SamplingParams(n=2, max_new_tokens=4, temperature=1.0))
    assert [(total, enabled, bar.n) for total, enabled, bar in calls] == [(3, True, 3), (1, False, 1)]
