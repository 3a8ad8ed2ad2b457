"""The `code` reward: run the completion's last ```python block against stdin/stdout tests in the sandbox.

sample["tests"] is a list of {"input": stdin text, "output": expected stdout}; the score is the fraction of
tests passed (1.0 only when all pass). Output matches when its whitespace-separated tokens equal the
expected ones (the usual judge rule: trailing spaces and newlines do not matter). A completion without a
closed ```python (or ```py) block scores 0.0. Once a test hits the time limit, the remaining tests are
counted as failed without running (a hung program would otherwise cost len(tests) x wall time).
Optional per-sample "time_limit_s" overrides the CPU and wall limits (wall = 2 x CPU).
A sandbox that cannot start raises (a counted failure), rather than scoring the model's code 0.
"""

from __future__ import annotations

import dataclasses
import re

from megatron_sapo.rewards.registry import RewardError, register_reward
from megatron_sapo.rewards.sandbox import SandboxLimits, run_python

_CODE_LIMITS = SandboxLimits()
_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", flags=re.DOTALL)


def set_code_limits(limits: SandboxLimits) -> None:
    """Process-wide sandbox limits for the `code` reward (the trainer sets them from its config)."""
    global _CODE_LIMITS
    _CODE_LIMITS = limits


def get_code_limits() -> SandboxLimits:
    return _CODE_LIMITS


def extract_program(completion: str) -> str | None:
    """The last closed ```python block of the completion, or None."""
    blocks = _BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def outputs_match(actual: str, expected: str) -> bool:
    return actual.split() == str(expected).split()


def _limits_for(sample: dict) -> SandboxLimits:
    limit = sample.get("time_limit_s")
    if limit is None:
        return _CODE_LIMITS
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise RewardError(f"code: sample['time_limit_s'] must be a positive number, got {limit!r}")
    return dataclasses.replace(_CODE_LIMITS, cpu_s=float(limit), wall_s=2.0 * float(limit))


def run_tests(program: str, tests: list, limits: SandboxLimits) -> list[bool]:
    """Pass/fail per test (see the module docstring for the timeout rule)."""
    passed: list[bool] = []
    for i, test in enumerate(tests):
        if not isinstance(test, dict) or "input" not in test or "output" not in test:
            raise RewardError(f"code: sample['tests'][{i}] must be {{'input': ..., 'output': ...}}, got {test!r:.200}")
        if passed and any(r is None for r in passed):
            passed.append(None)
            continue
        result = run_python(program, stdin=str(test["input"]), limits=limits)
        if result.setup_error:
            raise RewardError(f"code: the sandbox could not run the program: {result.setup_error}")
        passed.append(None if result.timed_out else (result.ok and outputs_match(result.stdout, test["output"])))
    return [bool(p) for p in passed]


@register_reward("code", required_fields=("tests",), description="fraction of stdin/stdout tests passed")
def code_reward(completion: str, sample: dict) -> float:
    tests = sample["tests"]
    if not isinstance(tests, list) or not tests:
        raise RewardError(f"code: sample['tests'] must be a non-empty list of {{input, output}}, got {tests!r:.200}")
    program = extract_program(completion)
    if program is None:
        return 0.0
    results = run_tests(program, tests, _limits_for(sample))
    return sum(results) / len(tests)
