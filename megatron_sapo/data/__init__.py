"""Prompt data: JSONL/Parquet files, the synthetic tasks, chat templates, a resumable mixture sampler,
and the tiny character-level tokenizer of the CPU recipe."""

from megatron_sapo.data.datasets import DataError, load_prompt_file, read_rows, validate_rows
from megatron_sapo.data.prompts import (
    Prompt,
    PromptSource,
    build_prompt_source,
    build_prompt_source_from_config,
    encode,
    make_prompts,
    render_prompt,
)
from megatron_sapo.data.sampler import MixtureSampler
from megatron_sapo.data.synthetic import SYNTHETIC_TASKS, make_synthetic_rows, write_jsonl
from megatron_sapo.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tiny_tokenizer, make_tiny_tokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SYNTHETIC_TASKS",
    "DataError",
    "MixtureSampler",
    "Prompt",
    "PromptSource",
    "build_prompt_source",
    "build_prompt_source_from_config",
    "build_tiny_tokenizer",
    "encode",
    "load_prompt_file",
    "make_prompts",
    "make_synthetic_rows",
    "make_tiny_tokenizer",
    "read_rows",
    "render_prompt",
    "validate_rows",
    "write_jsonl",
]
