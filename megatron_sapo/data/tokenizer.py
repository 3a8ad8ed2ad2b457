"""A tiny character-level tokenizer for the CPU recipe, built locally (no hub) with the `tokenizers` library.

    path = build_tiny_tokenizer("runs/tiny/tokenizer")   # tokenizer.json + tokenizer_config.json
    tok = transformers.AutoTokenizer.from_pretrained(path)  # or an SGLang server's --tokenizer-path

One token per character of TINY_CHARS (digits, lowercase letters, space, newline and a little punctuation),
ids 0-3 for <pad>, <bos>, <eos>, <unk>, then reserved special tokens up to `vocab_size` (default 64) so that
every id a model with that vocabulary can sample decodes (reserved ones decode to nothing with
skip_special_tokens). Encoding adds <bos> in front; decoding concatenates characters (no spaces added).
There is no chat template: prompts are used as raw text.
"""

from __future__ import annotations

import json
import os

TINY_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz :=+-*>?.,|#\n"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def tiny_vocab(vocab_size: int = 64) -> dict[str, int]:
    """token -> id; raises if vocab_size cannot hold the specials and characters."""
    base = list(SPECIALS) + list(TINY_CHARS)
    if vocab_size < len(base):
        raise ValueError(f"tiny tokenizer: vocab_size={vocab_size} is below the {len(base)} tokens it needs")
    tokens = base + [f"<reserved_{i}>" for i in range(vocab_size - len(base))]
    return {tok: i for i, tok in enumerate(tokens)}


def make_tiny_tokenizer(vocab_size: int = 64):
    """The `tokenizers.Tokenizer` object (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = tiny_vocab(vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char a token
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    specials = [t for t in vocab if t.startswith("<") and len(t) > 1]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 64, model_max_length: int = 128) -> str:
    """Write an HF-compatible tokenizer folder (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) and return its path. Idempotent: the same arguments write the same bytes."""
    os.makedirs(out_dir, exist_ok=True)
    make_tiny_tokenizer(vocab_size).save(os.path.join(out_dir, "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    return out_dir
