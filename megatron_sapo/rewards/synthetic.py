"""Rewards of the synthetic tasks (megatron_sapo.data.synthetic): `copy`, `reverse`, `add`.

All three answer with a short digit string, scored densely so that a random-init policy already gets a
small, varied reward within a group, while a perfect one gets 1.0:

    reward = 0.8 * mean_i credit(completion[i])  +  0.2 * [len(completion) == len(answer)]
    credit = 1.0 for the right character, 0.5 for a character of the answer in the wrong place,
             0.25 for any other digit, 0 otherwise (or past the end of the completion);
             i runs over the answer positions

The completion is compared after stripping surrounding whitespace. With a near-uniform policy over a
64-token vocabulary the mean is about 0.05 (most groups have non-zero spread); "digits only" reaches about
0.25-0.45, putting the right digits in place the rest.
"""

from __future__ import annotations

from megatron_sapo.rewards.registry import RewardError, register_reward

DIGITS = frozenset("0123456789")


def shaped_match(completion: str, answer: str, alphabet: frozenset = DIGITS) -> float:
    """The reward above, in [0, 1]."""
    if not answer:
        raise RewardError("synthetic: the sample's answer is empty")
    out = completion.strip()
    in_answer = set(answer)
    credit = 0.0
    for i, want in enumerate(answer):
        if i >= len(out):
            break
        ch = out[i]
        credit += 1.0 if ch == want else 0.5 if ch in in_answer else 0.25 if ch in alphabet else 0.0
    return (4.0 * credit / len(answer) + (len(out) == len(answer))) / 5.0  # 0.8*mean + 0.2*stop, 1.0 exact


def _synthetic(completion: str, sample: dict) -> float:
    return shaped_match(completion, str(sample["answer"]))


for _task in ("copy", "reverse", "add"):
    register_reward(_task, required_fields=("answer",), description=f"synthetic '{_task}' task, shaped match")(
        _synthetic
    )
