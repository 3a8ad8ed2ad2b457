"""GPU path: Transformer Engine layer specs, bf16, NCCL; checked against the HF model like the CPU path."""

import pytest
import torch

from megatron_sapo.config import load_config

pytestmark = pytest.mark.gpu


def test_te_engine_log_probs_match_hf_model():
    from megatron_sapo.megatron.engine import MegatronEngine
    from megatron_sapo.rollout.local import build_hf_model
    from megatron_sapo.rollout.weights import megatron_to_hf

    cfg = load_config(None, ["model.vocab_size=64", "model.dtype=fp32"])
    engine = MegatronEngine(cfg)
    try:
        hf_state = megatron_to_hf(engine.global_state_dict(), cfg.model)
        model = build_hf_model(cfg.model)
        model.load_state_dict(hf_state, strict=True)
        tokens = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(0))
        lp = engine.compute_log_probs({"tokens": tokens, "loss_mask": torch.ones(4, 23), "advantages": torch.zeros(4)})
        with torch.no_grad():
            ref = torch.log_softmax(model(tokens).logits.float(), -1)[:, :-1]
        ref = ref.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        assert (lp - ref).abs().max().item() < 1e-3  # TE kernels (TF32) vs eager fp32
    finally:
        engine.shutdown()
