"""Rewards: verifiers by task name, the code sandbox, and concurrent batch scoring.

    from megatron_sapo.rewards import compute_reward, score_batch, REWARDS
    compute_reward("math", "... so the answer is \\\\boxed{1/2}", {"answer": "0.5"})  # -> 1.0
    REWARDS.names()  # ['add', 'choice', 'code', 'copy', 'logic', 'math', 'reverse']

Register a new verifier with `@register_reward("name", required_fields=("answer",))` on a
`fn(completion, sample) -> float`.
"""

from megatron_sapo.rewards import code, synthetic, verifiers  # noqa: F401  (registers the tasks)
from megatron_sapo.rewards.code import extract_program, set_code_limits
from megatron_sapo.rewards.pool import BatchScores, score_batch
from megatron_sapo.rewards.registry import (
    REWARDS,
    RewardError,
    RewardSpec,
    compute_reward,
    missing_fields,
    register_reward,
)
from megatron_sapo.rewards.sandbox import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    isolation_report,
    run_python,
)
from megatron_sapo.rewards.synthetic import shaped_match
from megatron_sapo.rewards.verifiers import extract_choice

__all__ = [
    "REWARDS",
    "BatchScores",
    "RewardError",
    "RewardSpec",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "compute_reward",
    "extract_choice",
    "extract_program",
    "isolation_report",
    "missing_fields",
    "register_reward",
    "run_python",
    "score_batch",
    "set_code_limits",
    "shaped_match",
]
