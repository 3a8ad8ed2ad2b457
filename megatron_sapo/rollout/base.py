"""The rollout-engine protocol shared by the local engine and SGLang."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


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

    def update_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> None: ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...
