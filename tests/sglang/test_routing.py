"""Routed experts reported by the server vs the trainer's routing (HF router logits) on the same weights."""

from __future__ import annotations

import torch

from megatron_sapo.rollout.base import SamplingParams

MIN_MATCH_RATE = 0.95  # share of (token, layer) whose top-k expert SET equals the trainer's


def test_routed_experts_shape_and_match(engine, tiny, initial_state, record_property):
    from megatron_sapo.rollout.local import build_hf_model

    cfg, _ = tiny
    layers, topk, experts = cfg.model.num_layers, cfg.model.moe_topk, cfg.model.num_experts
    model = build_hf_model(cfg.model, 2)
    model.load_state_dict(initial_state)
    prompts = [[1, 5, 6, 7, 8], [1, 12, 13, 14, 15, 16, 17], [1, 44]]
    samples = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=10, temperature=1.0))
    same = total = 0
    for s in samples:
        seq = s.prompt_ids + s.response_ids
        r = s.routed_experts
        assert r is not None and r.dtype == torch.int32
        # one row per token the server forwarded: the prompt and all but the last response token
        assert tuple(r.shape) == (len(seq) - 1, layers, topk)
        assert int(r.min()) >= 0 and int(r.max()) < experts
        assert all(len(set(row.tolist())) == topk for row in r.view(-1, topk))  # top-k experts are distinct
        with torch.no_grad():
            out = model(torch.tensor([seq[:-1]]), output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            trainer = logits.view(len(seq) - 1, experts).topk(topk, dim=-1).indices.sort(-1).values
            served = r[:, layer, :].long().sort(-1).values
            same += int((trainer == served).all(-1).sum())
            total += trainer.shape[0]
    rate = same / total
    record_property("routing_match_rate", rate)
    print(f"routed experts: top-{topk} set equal to the trainer's for {same}/{total} (token, layer) = {rate:.4f}")
    assert rate >= MIN_MATCH_RATE
