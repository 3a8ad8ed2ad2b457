"""A cheaper attention-mask builder for the in-process HF rollout engine (same mask, same tokens).

transformers (4.5x, torch >= 2.6) builds the boolean causal+padding mask of every generate() step with
torch.vmap over the batch, query and key indices. For a tiny CPU model that costs about as much as the
model itself: ~45% of LocalEngine.generate on the tiny recipe (tools/bench_vs_trl.py). For the plain causal
mask that every decoder-only model here asks for, `causal_padding_mask` computes the same boolean tensor
by broadcasting two aranges and indexing the padding mask; anything else (sliding windows, packed sequences,
or/and masks) goes to transformers' own builder. Registered as attention implementation SDPA_FAST: sdpa
attention with this mask (tests/unit/test_local_engine.py checks the tokens are identical to plain sdpa).
"""

from __future__ import annotations

import torch

SDPA_FAST = "megatron_sapo_sdpa"


def causal_padding_mask(
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """transformers.masking_utils.sdpa_mask's result ([batch, 1, query, kv] bool, True = attend, or None
    when sdpa's is_causal suffices), built without vmap for the plain causal mask function."""
    from transformers import masking_utils as mu

    if mask_function is not None and mask_function is not mu.causal_mask_function:
        return mu.sdpa_mask(
            batch_size, cache_position, kv_length, kv_offset, mask_function, attention_mask, local_size,
            allow_is_causal_skip, **kwargs,
        )  # fmt: skip
    padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    q_length = cache_position.shape[0]
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, kv_offset, local_size):
        return None
    kv_index = torch.arange(kv_length, device=cache_position.device) + kv_offset
    causal = (kv_index[None, :] <= cache_position[:, None])[None, None]  # [1, 1, q, kv]
    if padding_mask is None:
        return causal.expand(batch_size, -1, -1, -1)
    return causal & padding_mask[:, None, None, kv_index]  # padding_mask: [batch, >= kv_offset + kv_length]


def register() -> str:
    """Register SDPA_FAST (sdpa attention + causal_padding_mask) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_FAST, sdpa_attention_forward)
    AttentionMaskInterface.register(SDPA_FAST, causal_padding_mask)
    return SDPA_FAST
