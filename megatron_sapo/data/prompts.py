"""Prompts for the rollout: files (or the synthetic task) -> rendered, tokenized, length-checked, sampled.

    source = build_prompt_source(cfg.data, tokenizer, seed=cfg.train.seed)
    batch = source.sample(cfg.rollout.prompts_per_step)   # list[Prompt]
    ckpt["data"] = source.state_dict(); ...; source.load_state_dict(ckpt["data"])
    source.stats()   # rows, dropped (too long) per source, epochs

Rendering: when the tokenizer has a chat template, a string prompt becomes one user message and the template
is applied with the generation prompt (its text already holds any BOS, so it is tokenized without adding
special tokens); a list of messages is templated as is. Without a template the raw string is tokenized with
the tokenizer's own special tokens (a list of messages is then an error). Prompts longer than
max_prompt_len tokens are dropped, counted and logged, never truncated; a source left with no rows is an
error. Images ("images": list, or "image": one) are carried through on Prompt.images for a multimodal
engine; the processor adds their tokens later, so the length check counts data.image_tokens per image (a
budget: Qwen-VL style processors emit a resolution-dependent number, capped by their max_pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from megatron_sapo.data.datasets import WHERE_KEY, DataError, load_prompt_file, validate_rows
from megatron_sapo.data.sampler import MixtureSampler
from megatron_sapo.data.synthetic import make_synthetic_rows

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    text: str  # what the engine gets (chat template applied)
    ids: list[int]  # its tokens
    task: str  # reward task name
    sample: dict  # the dataset row, passed to the reward
    source: str  # file path, or "synthetic:<task>"
    index: int  # row index within the source's file (before dropping)
    images: list | None = None

    @property
    def where(self) -> str:
        return self.sample.get(WHERE_KEY, f"{self.source}, row {self.index + 1}")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def render_prompt(tokenizer, prompt, where: str = "prompt") -> tuple[str, bool]:
    """(text, templated): the chat template applied when the tokenizer has one, else the raw string."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    if not isinstance(prompt, str):
        raise DataError(f"{where}: the prompt is a list of chat messages but the tokenizer has no chat template")
    return prompt, False


def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids from an HF tokenizer or a `tokenizers.Tokenizer`."""
    out = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def _images(row: dict) -> list | None:
    if row.get("images") is not None:
        return list(row["images"])
    if row.get("image") is not None:
        return [row["image"]]
    return None


def make_prompts(
    rows: list[dict], source: str, tokenizer, max_prompt_len: int, prompt_key: str = "prompt", image_tokens: int = 0
):
    """Render and tokenize validated rows; returns (prompts that fit, number dropped as too long). A prompt's
    length is its tokens plus `image_tokens` per image."""
    prompts, dropped, longest = [], 0, None
    for i, row in enumerate(rows):
        where = row.get(WHERE_KEY, f"{source}, row {i + 1}")
        text, templated = render_prompt(tokenizer, row[prompt_key], where)
        ids = encode(tokenizer, text, add_special_tokens=not templated)
        images = _images(row)
        length = len(ids) + image_tokens * len(images or ())
        if length > max_prompt_len:
            dropped += 1
            if longest is None or length > longest[0]:
                longest = (length, where)
            continue
        prompts.append(Prompt(text, ids, row["task"], row, source, i, images))
    if dropped:
        log.warning(
            "%s: dropped %d of %d prompts longer than max_prompt_len=%d tokens (longest: %d tokens, %s)",
            source,
            dropped,
            len(rows),
            max_prompt_len,
            longest[0],
            longest[1],
        )
    if not prompts:
        raise DataError(
            f"{source}: all {len(rows)} prompts are longer than max_prompt_len={max_prompt_len} tokens "
            f"(the longest has {longest[0]}, {longest[1]}); raise data.max_prompt_len"
        )
    return prompts, dropped


@dataclass
class PromptSource:
    """Prompt lists, one per source, and the mixture sampler over them."""

    sources: list[str]
    prompts: list[list[Prompt]]
    dropped: list[int]
    sampler: MixtureSampler = field(repr=False)

    def sample(self, k: int) -> list[Prompt]:
        return [self.prompts[ds][row] for ds, row in self.sampler.take(k)]

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "sources": list(self.sources)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sources") != self.sources:
            raise ValueError(
                f"prompt source mismatch: the checkpoint used {state.get('sources')}, this run {self.sources}"
            )
        self.sampler.load_state_dict(state["sampler"])

    def stats(self) -> dict[str, float]:
        """Flat numbers for metrics: data/<i>/rows, data/<i>/dropped, data/<i>/epochs."""
        out: dict[str, float] = {}
        for i, (p, d, e) in enumerate(zip(self.prompts, self.dropped, self.sampler.epochs())):
            out.update({f"data/{i}/rows": float(len(p)), f"data/{i}/dropped": float(d), f"data/{i}/epochs": e})
        return out


def build_prompt_source(
    paths: list[str],
    tokenizer,
    *,
    max_prompt_len: int,
    seed: int,
    weights: list[float] | None = None,
    prompt_key: str = "prompt",
    default_task: str | None = None,
    synthetic_task: str = "copy",
    synthetic_size: int = 4096,
    image_tokens: int = 0,
) -> PromptSource:
    """Prompt files mixed by `weights` (default: proportional to their sizes after dropping), or, when
    `paths` is empty, `synthetic_size` rows of the synthetic task (generated from `seed`)."""
    if weights and len(weights) != len(paths):
        raise DataError(f"data.weights: one weight per path: {len(weights)} weights for {len(paths)} paths")
    sources, prompts, dropped = [], [], []
    if paths:
        for path in paths:
            rows = load_prompt_file(path, prompt_key=prompt_key, default_task=default_task)
            kept, n_dropped = make_prompts(rows, path, tokenizer, max_prompt_len, prompt_key, image_tokens)
            sources.append(path)
            prompts.append(kept)
            dropped.append(n_dropped)
    else:
        name = f"synthetic:{synthetic_task}"
        rows = validate_rows(make_synthetic_rows(synthetic_task, synthetic_size, seed=seed), "prompt")
        kept, n_dropped = make_prompts(rows, name, tokenizer, max_prompt_len, "prompt")
        sources, prompts, dropped = [name], [kept], [n_dropped]
    sampler = MixtureSampler([len(p) for p in prompts], list(weights) if weights else None, seed)
    return PromptSource(sources, prompts, dropped, sampler)


def build_prompt_source_from_config(data_cfg, tokenizer, seed: int) -> PromptSource:
    """From megatron_sapo.config.DataConfig (paths, weights, synthetic_task, max_prompt_len, prompt_key)."""
    return build_prompt_source(
        list(data_cfg.paths),
        tokenizer,
        max_prompt_len=data_cfg.max_prompt_len,
        seed=seed,
        weights=list(data_cfg.weights) or None,
        prompt_key=data_cfg.prompt_key,
        default_task=getattr(data_cfg, "default_task", None),
        synthetic_task=data_cfg.synthetic_task,
        synthetic_size=getattr(data_cfg, "synthetic_size", 4096),
        image_tokens=getattr(data_cfg, "image_tokens", 0),
    )
