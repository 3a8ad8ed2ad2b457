"""context_parallel.py's layout helpers at world size 1 (the CP2 invariance runs in tests/dist)."""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.megatron import compat, context_parallel


class _Group:
    """What megatron's rope helper asks of a CP group."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp", [2, 4])
def test_positions_are_megatrons_rope_layout(cp):
    """Each rank's columns are the ones megatron's rotary embedding selects for it, so rope and tokens agree."""
    compat.apply_patches()  # the rope helper pins memory and calls .cuda()
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    length = 8 * cp
    every = []
    for rank in range(cp):
        mine = context_parallel.local_positions(length, cp, rank)
        rope_rows = get_pos_emb_on_this_cp_rank(torch.arange(length)[:, None], 0, _Group(cp, rank))[:, 0]
        assert torch.equal(mine, rope_rows)
        every.append(mine)
    assert torch.equal(torch.sort(torch.cat(every)).values, torch.arange(length))  # a partition of the row


def test_gathered_order_restores_the_row():
    length, cp = 24, 3
    gathered = torch.cat([context_parallel.local_positions(length, cp, r) for r in range(cp)])
    assert torch.equal(gathered[context_parallel._gathered_order(length, cp)], torch.arange(length))


def test_length_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="2\\*cp=4 chunks: length 10"):
        context_parallel.local_positions(10, 2, 0)


def test_local_spec_gets_the_cp_attention_only_with_cp():
    from megatron_sapo.config import Config
    from megatron_sapo.megatron import model

    compat.apply_patches()
    cfg = Config()
    for cp, expect_cp_class in ((1, False), (2, True)):
        cfg.parallel.cp = cp
        tcfg = model.build_transformer_config(cfg.model, cfg.parallel)
        core = model.layer_spec(tcfg, cfg.model).submodules.self_attention.submodules.core_attention
        assert (core is context_parallel.all_gather_kv_attention()) == expect_cp_class
