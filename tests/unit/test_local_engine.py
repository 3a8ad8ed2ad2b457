"""The local engine's vmap-free attention mask (rollout/hf_mask.py): the same mask as transformers' sdpa
builder, hence the same sampled tokens and log-probs."""

import pytest
import torch
from transformers import masking_utils as mu

from megatron_sapo.config import load_config
from megatron_sapo.rollout import hf_mask
from megatron_sapo.rollout.base import SamplingParams
from megatron_sapo.rollout.local import LocalEngine


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
