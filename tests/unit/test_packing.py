"""Sequence packing (train.pack_sequences, megatron/packing.py): several sequences per row with a
block-diagonal causal mask give the same log-probs, loss and gradients as one sequence per row, in fewer rows."""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.config import Config, ConfigError, load_config
from megatron_sapo.megatron import model, packing, weights
from tests.batches import max_rel_diff

VOCAB = 128


def test_plan_rows_keeps_order_and_capacity():
    lengths = [5, 3, 0, 8, 2, 2, 7, 1]
    plan = packing.plan_rows(lengths, 8, 2)
    flat = [i for mb in plan for row in mb for i in row]
    assert flat == list(range(len(lengths)))  # every sequence once, in order
    assert all(len(mb) <= 2 for mb in plan)
    assert all(sum(lengths[i] for i in row) <= 8 for mb in plan for row in mb)
    assert plan == [[[0, 1, 2], [3]], [[4, 5], [6, 7]]]  # next fit: a row closes when the next does not fit


def test_block_causal_mask():
    segments = torch.tensor([[0, 0, 1, 1, -5]])
    allowed = ~packing.block_causal_mask(segments)[0, 0]
    assert allowed[1].tolist() == [True, True, False, False, False]
    assert allowed[3].tolist() == [False, False, True, True, False]  # never into the previous sequence
    assert allowed[4].tolist() == [False, False, False, False, True]  # padding: itself only


def _config(pack: bool) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.num_layers, m.num_experts, m.dtype = VOCAB, 2, 4, "fp32"
    m.moe_router_load_balancing = "none"  # the aux loss is defined per micro-batch token group: not invariant
    cfg.train.micro_batch_size, cfg.train.pack_sequences = 4, pack
    return cfg


def _batch() -> dict:
    """8 sequences of very different lengths (3-14 prompt+response positions of 20)."""
    g = torch.Generator().manual_seed(11)
    n, s = 8, 21
    tokens = torch.randint(1, VOCAB, (n, s), generator=g)
    mask = torch.zeros(n, s - 1)
    for i, (prompt, response) in enumerate([(2, 3), (3, 11), (2, 2), (4, 4), (3, 2), (2, 17), (5, 3), (2, 5)]):
        mask[i, prompt - 1 : prompt - 1 + response] = 1.0
        tokens[i, prompt + response :] = 0
    return {"tokens": tokens, "loss_mask": mask, "advantages": torch.randn(n, generator=g)}


@pytest.fixture(scope="module")
def results():
    from megatron_sapo.megatron.engine import MegatronEngine

    if model.have_transformer_engine():  # a GPU with TE: packing is refused there (see the test below)
        pytest.skip("train.pack_sequences is refused with Transformer Engine attention")
    batch, out = _batch(), {}
    for pack in (False, True):
        eng = MegatronEngine(_config(pack))
        try:
            if not pack:
                w0 = eng.global_state_dict()
            eng.load_global_state_dict(w0)
            lp, entropy = eng.compute_log_probs(batch, with_entropy=True)
            if not pack:
                g = torch.Generator().manual_seed(2)
                batch["old_log_probs"] = (lp + 0.2 * torch.randn(lp.shape, generator=g)) * batch["loss_mask"]
            length = eng._length(batch)
            rows = sum(mb["tokens"].shape[0] for mb in eng._microbatches(batch, length))
            metrics = eng.forward_backward(batch)
            out[pack] = dict(lp=lp, entropy=entropy, rows=rows, loss=metrics["loss"], grads=_grads(eng))
        finally:
            eng.shutdown()
    return batch, out


def _grads(eng) -> dict:
    return weights.gather_global(eng.model, "grad")


def test_packed_rows_are_fewer(results):
    _, out = results
    # lengths 4, 13, 3, 7, 4, 18, 7, 6 in rows of 18: [4 13] [3 7 4] [18] [7 6], one micro-batch of 4 rows;
    # unpacked: 2 micro-batches of 4 sequences
    assert packing.sequence_lengths(_batch()["loss_mask"]).tolist() == [4, 13, 3, 7, 4, 18, 7, 6]
    assert out[False]["rows"] == 8 and out[True]["rows"] == 4


def test_packed_log_probs_and_entropy_match(results):
    batch, out = results
    mask = batch["loss_mask"] > 0
    torch.testing.assert_close(out[True]["lp"][mask], out[False]["lp"][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True]["entropy"][mask], out[False]["entropy"][mask], rtol=1e-5, atol=1e-5)


def test_packed_loss_and_gradients_match(results):
    _, out = results
    assert out[True]["loss"] == pytest.approx(out[False]["loss"], rel=1e-5, abs=1e-7)
    ref, got = out[False]["grads"], out[True]["grads"]
    assert ref.keys() == got.keys()
    worst = max_rel_diff(got, ref)
    assert worst < 1e-4, worst


def test_packed_routing_replay_matches_unpacked():
    """r2 / r3 on packed rows: every token is forced to its own sequence's experts. Forced to another token's
    experts (far from the free routing), packed and unpacked passes agree: misplaced ids would not. Routing
    recorded on packed rows comes back per sequence."""
    from megatron_sapo.megatron.engine import MegatronEngine
    from megatron_sapo.megatron.routing import REPLAY_KEY

    if model.have_transformer_engine():
        pytest.skip("train.pack_sequences is refused with Transformer Engine attention")
    batch, out = _batch(), {}
    mask = batch["loss_mask"] > 0
    for pack in (False, True):
        eng = MegatronEngine(_config(pack))
        try:
            if not pack:
                w0 = eng.global_state_dict()
                free, rec = eng.compute_log_probs(batch, record_routing=True)
                forced = dict(batch, old_log_probs=free * batch["loss_mask"])
                forced[REPLAY_KEY] = torch.roll(rec["ids"], 1, dims=1)
            eng.load_global_state_dict(w0)
            lp, recorded = eng.compute_log_probs(forced, record_routing=True)
            _, free_recorded = eng.compute_log_probs(batch, record_routing=True)
            metrics, used = eng.forward_backward(forced, record_routing=True)
            out[pack] = (lp, metrics["loss"], _grads(eng), recorded, free_recorded, used)
        finally:
            eng.shutdown()
    assert float((out[False][0] - free)[mask].abs().max()) > 1e-2  # the forced routing really changes the policy
    # routing records of packed passes come back per sequence: the forced ids, the same probabilities
    for rec in (out[True][3], out[True][5]):
        assert torch.equal(rec["ids"][mask].long(), forced[REPLAY_KEY][mask].long())
    torch.testing.assert_close(out[True][3]["probs"][mask], out[False][3]["probs"][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][3]["entropy"][mask], out[False][3]["entropy"][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][5]["log_probs"][mask], out[False][5]["log_probs"][mask], rtol=1e-5, atol=1e-5)
    same = (out[True][4]["ids"][mask] == out[False][4]["ids"][mask]).all(-1).float().mean()
    assert float(same) >= 0.98  # free routing: identical but for near-ties flipped by float rounding
    torch.testing.assert_close(out[True][0][mask], out[False][0][mask], rtol=1e-5, atol=1e-5)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5, abs=1e-7)
    ref, got = out[False][2], out[True][2]
    worst = max_rel_diff(got, ref)
    assert worst < 1e-4, worst


def test_negative_control_without_the_block_mask(monkeypatch):
    """Packed rows with a plain causal mask let sequences attend to their row neighbours: log-probs change, so
    the comparisons above can fail."""
    from megatron_sapo.megatron.engine import MegatronEngine

    batch = _batch()
    block_mask = packing.block_causal_mask
    causal_only = lambda seg: block_mask(torch.zeros_like(seg))  # noqa: E731  (one segment per row)
    eng = MegatronEngine(_config(True))
    try:
        packed = eng.compute_log_probs(batch)
        monkeypatch.setattr(packing, "block_causal_mask", causal_only)
        leaky = eng.compute_log_probs(batch)
    finally:
        eng.shutdown()
    mask = batch["loss_mask"] > 0
    assert float((leaky - packed)[mask].abs().max()) > 1e-3


def test_packing_with_a_virtual_pipeline_is_refused():
    with pytest.raises(ConfigError, match="train.pack_sequences"):
        load_config(None, ["train.pack_sequences=true", "parallel.pp=2", "parallel.vpp=2", "model.num_layers=4"])


def test_packing_is_refused_with_transformer_engine(monkeypatch):
    """TE attention ignores an explicit mask under its causal type: packed rows would attend across sequences."""
    from megatron_sapo.megatron.engine import MegatronEngine

    monkeypatch.setattr(model, "have_transformer_engine", lambda: True)
    with pytest.raises(ValueError, match="train.pack_sequences"):
        MegatronEngine(_config(True))
    # refused before any process group exists: an engine can still be built in this process
    monkeypatch.undo()
    MegatronEngine(_config(True)).shutdown()
