"""Build the tiny Qwen3-MoE checkpoint + tokenizer an SGLang CPU server can load, from our own code (no hub).

    python tools/sglang_cpu_kit/make_tiny_model.py OUT_DIR [--config examples/tiny_moe_cpu.yaml] [--seed 0]
        [--megatron] [key=value ...]

Weights: a random-initialised Megatron policy (MegatronEngine, with --megatron) or the HF model class with the
same config (default: faster, no torch.distributed), passed through rollout/weights.megatron_to_hf /
save_hf_checkpoint when Megatron-made. Tokenizer: data/tokenizer.build_tiny_tokenizer, written into the
same folder (SGLang reads both from --model-path). Run it with the trainer's Python (not the kit venv).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_sapo.config import Config, load_config  # noqa: E402
from megatron_sapo.data.tokenizer import EOS_ID, build_tiny_tokenizer  # noqa: E402
from megatron_sapo.rollout.weights import megatron_to_hf, save_hf_checkpoint  # noqa: E402


def hf_state_from_megatron(cfg: Config) -> dict[str, torch.Tensor]:
    from megatron_sapo.megatron.engine import MegatronEngine

    engine = MegatronEngine(cfg)
    try:
        return megatron_to_hf(engine.global_state_dict(), cfg.model)
    finally:
        engine.shutdown()


def hf_state_random(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    from megatron_sapo.rollout.local import build_hf_model

    torch.manual_seed(seed)
    model = build_hf_model(cfg.model, EOS_ID)
    with torch.no_grad():
        # 5x Megatron's init std: at init scale the tiny model's next-token and router distributions are close to
        # uniform, so greedy and top-k choices would hinge on near-ties; this keeps them decisive.
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, cfg.model.init_method_std * 5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build(out_dir: str, cfg: Config, seed: int = 0, megatron: bool = False) -> str:
    """Write config.json + model.safetensors + tokenizer files to out_dir; returns it."""
    state = hf_state_from_megatron(cfg) if megatron else hf_state_random(cfg, seed)
    save_hf_checkpoint(state, cfg.model, out_dir, eos_token_id=EOS_ID)
    build_tiny_tokenizer(out_dir, vocab_size=cfg.model.vocab_size, model_max_length=cfg.model.max_seq_len)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--config", default=os.path.join(REPO, "examples", "tiny_moe_cpu.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--megatron", action="store_true", help="initialise through MegatronEngine + megatron_to_hf")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.max_seq_len=128")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    build(args.out_dir, cfg, args.seed, args.megatron)
    print(f"tiny model ({cfg.model.num_layers} layers, {cfg.model.num_experts} experts, top-{cfg.model.moe_topk}, "
          f"vocab {cfg.model.vocab_size}) -> {args.out_dir}")  # fmt: skip


if __name__ == "__main__":
    main()
