"""The local engine: its vmap-free attention mask (rollout/hf_mask.py) is the same mask as transformers' sdpa
builder, hence the same sampled tokens and log-probs; its sampling draws from softmax(logits / T) with a
private generator, leaving the global RNG alone."""

import pytest
import torch
from transformers import masking_utils as mu

from megatron_sapo.config import load_config
from megatron_sapo.rollout import hf_mask
from megatron_sapo.rollout.base import SamplingParams
from megatron_sapo.rollout.local import ExponentialRaceSampler, LocalEngine


def _left_padded(lengths, width):
    return torch.stack([torch.arange(width) >= width - n for n in lengths]).long()


@pytest.mark.parametrize("lengths", [[5, 3, 1, 5], [4, 4]])
def test_mask_equals_transformers_sdpa_mask(lengths):
    width, new = max(lengths), 3
    attention = torch.cat([_left_padded(lengths, width), torch.ones(len(lengths), new, dtype=torch.long)], dim=1)
    cases = [(torch.arange(width), width, attention[:, :width])]  # prefill
    cases += [(torch.tensor([width + k]), width + k + 1, attention[:, : width + k + 1]) for k in range(new)]  # decode
    for cache_position, kv_length, mask_2d in cases:
        args = dict(batch_size=len(lengths), cache_position=cache_position, kv_length=kv_length, kv_offset=0,
                    mask_function=mu.causal_mask_function, attention_mask=mask_2d.bool())  # fmt: skip
        want, got = mu.sdpa_mask(**args), hf_mask.causal_padding_mask(**args)
        if want is None:  # no padding: sdpa's is_causal instead of a mask
            assert got is None
        else:
            assert got.shape == want.shape and torch.equal(got, want)


def test_other_mask_functions_are_delegated():
    window = mu.sliding_window_causal_mask_function(2)
    args = dict(batch_size=2, cache_position=torch.arange(4), kv_length=4, mask_function=window,
                attention_mask=_left_padded([4, 2], 4).bool())  # fmt: skip
    assert torch.equal(hf_mask.causal_padding_mask(**args), mu.sdpa_mask(**args))


def test_generate_is_unchanged_by_the_mask():
    cfg = load_config(None, ["model.vocab_size=64"])
    torch.manual_seed(0)
    fast = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    assert fast.model.config._attn_implementation == hf_mask.SDPA_FAST
    plain = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    plain.model.load_state_dict(fast.model.state_dict())
    plain.model.set_attn_implementation("sdpa")
    params = SamplingParams(n=4, max_new_tokens=6, temperature=0.9, seed=3)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 4, 4]]  # left padding of 0, 4 and 3 positions
    got, want = fast.generate(prompts, params), plain.generate(prompts, params)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    assert [s.rollout_log_probs for s in got] == [s.rollout_log_probs for s in want]


def test_exponential_race_samples_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    draws = 40_000
    sampler = ExponentialRaceSampler(torch.Generator().manual_seed(0))
    picks = torch.stack([sampler(None, logits).argmax(-1) for _ in range(draws)]).flatten()
    freq = torch.bincount(picks, minlength=5).double() / draws
    want = torch.softmax(logits.double(), -1).flatten()
    assert freq[4] == 0  # a masked token is never drawn
    # 4 binomial standard errors: a wrong distribution (e.g. softmax(2 * logits), or argmax) is far outside
    assert torch.all((freq - want).abs() <= 4 * (want * (1 - want) / draws).sqrt() + 1e-12), (freq, want)


def test_generate_leaves_the_global_rng_alone_and_repeats_by_seed():
    cfg = load_config(None, ["model.vocab_size=64"])
    torch.manual_seed(0)
    engine = LocalEngine(cfg.model, eos_token_id=2, pad_token_id=0)
    params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    prompts = [[1, 5, 6], [1, 9]]
    state = torch.get_rng_state()
    first = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):  # another global state (restored after): the same samples
        torch.manual_seed(123)
        again = engine.generate(prompts, params)
    assert [s.response_ids for s in again] == [s.response_ids for s in first]
    other = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=8))
    assert [s.response_ids for s in other] != [s.response_ids for s in first]
