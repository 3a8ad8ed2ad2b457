"""The reward registry: task name -> verifier, and `compute_reward(task, completion, sample) -> float`.

A verifier is `fn(completion: str, sample: dict) -> float`, usually in [0, 1]. It may raise (the batch scorer
logs and counts that as a failure with reward 0) and may return NaN (reported as such; the trainer skips it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

RewardFn = Callable[[str, dict], float]


class RewardError(ValueError):
    """A reward could not be computed for a reason that names the culprit (task, field, value)."""


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    required_fields: tuple[str, ...] = ()
    description: str = ""


class RewardRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, RewardSpec] = {}

    def register(
        self, name: str, *, required_fields: tuple[str, ...] = (), description: str = ""
    ) -> Callable[[RewardFn], RewardFn]:
        def deco(fn: RewardFn) -> RewardFn:
            if name in self._specs and self._specs[name].fn is not fn:
                raise ValueError(f"reward task {name!r} is already registered (by {self._specs[name].fn.__module__})")
            self._specs[name] = RewardSpec(name, fn, tuple(required_fields), description)
            return fn

        return deco

    def get(self, name: str) -> RewardSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise RewardError(f"unknown reward task {name!r}; valid tasks: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs


REWARDS = RewardRegistry()
register_reward = REWARDS.register


def missing_fields(task: str, sample: dict) -> list[str]:
    """The fields the task's verifier needs that `sample` lacks (the data loader checks this at load time)."""
    return [f for f in REWARDS.get(task).required_fields if f not in sample]


def compute_reward(task: str, completion: str, sample: dict) -> float:
    """Score one completion. Raises RewardError on an unknown task or a sample missing a needed field;
    the verifier's own exceptions propagate (score_batch turns them into counted failures). May be NaN."""
    spec = REWARDS.get(task)
    missing = missing_fields(task, sample)
    if missing:
        raise RewardError(f"reward task {task!r} needs field(s) {missing} in the sample; it has {sorted(sample)}")
    value = spec.fn(completion, sample)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise RewardError(f"reward task {task!r} returned {type(value).__name__} {value!r}, not a number")
    value = float(value)
    if math.isinf(value):
        raise RewardError(f"reward task {task!r} returned {value}")
    return value
