"""The rollout-engine protocol shared by the local engine and SGLang."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")

# Weights for a sync, HF-named: one dict, or an iterable of dicts (buckets) that the trainer streams so that no
# process holds the whole model at once. An iterable may be consumed once only.
HFWeights = Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]


def cut_by_size(items: Iterable[T], nbytes: Callable[[T], int], bucket_mb: float) -> Iterator[list[T]]:
    """Consecutive groups of items of about bucket_mb MB in all (an item larger than that is a group of its own)."""
    limit = max(bucket_mb, 1e-6) * 2**20
    current, size = [], 0
    for item in items:
        item_bytes = nbytes(item)
        if current and size + item_bytes > limit:
            yield current
            current, size = [], 0
        current.append(item)
        size += item_bytes
    if current:
        yield current


def weight_buckets(weights: HFWeights, bucket_mb: float) -> Iterator[dict[str, torch.Tensor]]:
    """Buckets of about bucket_mb MB: a dict is cut in order (a larger tensor is a bucket of its own); an
    iterable of buckets passes through as it is (empty ones skipped)."""
    if not isinstance(weights, Mapping):
        yield from (dict(bucket) for bucket in weights if bucket)
        return

    def nbytes(item: tuple[str, torch.Tensor]) -> int:
        return item[1].numel() * item[1].element_size()

    yield from map(dict, cut_by_size(weights.items(), nbytes, bucket_mb))


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, is_last) pairs, looking one item ahead (the last bucket of a sync carries its version)."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


@dataclass
class Sample:
    """One response to one prompt, with what the engine reported about it."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_log_probs: list[float]  # log pi_rollout of each response token
    finish_reason: str  # "stop" (EOS) or "length"
    group: int  # index of the prompt in this step: the advantage group
    weight_version: int
    routed_experts: torch.Tensor | None = None  # [tokens, layers, topk] when the engine reports it
    reward: float = 0.0
    info: dict = field(default_factory=dict)


@dataclass
class SamplingParams:
    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """n samples per prompt, ordered by prompt then sample; Sample.group is the prompt index."""
        ...

    def update_weights(self, weights: HFWeights, version: int) -> None:
        """Load the HF-named weights (a dict or streamed buckets) and tag them with `version`."""
        ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...
