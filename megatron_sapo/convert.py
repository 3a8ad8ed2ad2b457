"""Checkpoint conversion: Megatron dist checkpoints <-> Hugging Face folders, at any parallel layout.

megatron-sapo convert CONFIG --checkpoint runs/x/checkpoints/step_40 --to-hf out/hf
megatron-sapo convert CONFIG --from-hf path/to/hf --to-checkpoint out/step_0
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from megatron_sapo.config import Config
from megatron_sapo.rollout.weights import save_hf_buckets
from megatron_sapo.run_state import MARKER, require_complete

HF_FILE_MB = 4096  # safetensors shard size of an exported HF checkpoint (HF hub uses 4-5 GB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _copy_tokenizer(src: str | None, dst: str) -> None:
    """Carry the tokenizer along, so that the HF folder loads (and serves) on its own."""
    for name in TOKENIZER_FILES:
        if src and os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def convert(
    cfg: Config,
    checkpoint: str | None = None,
    from_hf: str | None = None,
    to_hf: str | None = None,
    to_checkpoint: str | None = None,
    tokenizer: str | None = None,
) -> None:
    """Load weights from exactly one source and write them to one or both targets."""
    from megatron_sapo.megatron.engine import MegatronEngine

    if (checkpoint is None) == (from_hf is None):
        raise ValueError("give exactly one source: --checkpoint DIR or --from-hf DIR")
    if to_hf is None and to_checkpoint is None:
        raise ValueError("give a target: --to-hf DIR and/or --to-checkpoint DIR")
    if checkpoint is not None:
        require_complete(checkpoint, "--checkpoint")
    engine = MegatronEngine(cfg)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        if checkpoint is not None:
            engine.load_checkpoint(checkpoint)
        else:
            engine.load_hf_checkpoint(from_hf)  # each rank reads only its own shards' tensors
        if to_hf is not None:
            # streamed: rank 0 writes one safetensors file per bucket as it arrives (the model is never whole)
            engine.export_hf(HF_FILE_MB, lambda buckets: save_hf_buckets(buckets, cfg.model, to_hf))
            if rank0:
                _copy_tokenizer(tokenizer or from_hf or cfg.data.tokenizer or cfg.model.hf_path, to_hf)
                print(f"wrote {to_hf}")
        if to_checkpoint is not None:
            engine.save_checkpoint(to_checkpoint, {"step": 0, "weight_version": 0}, weights_only=True)
            if dist.is_initialized():
                dist.barrier()
            if rank0:
                with open(os.path.join(to_checkpoint, MARKER), "w") as f:  # no `latest`: not a run folder
                    f.write("ok\n")
                print(f"wrote {to_checkpoint}")
    finally:
        engine.shutdown()
