"""Verifiers with a reference answer: `math` (math-verify), `choice` (multiple choice), `logic` (ZebraLogic).

Formats:
- math: sample["answer"] is the reference (LaTeX or plain, e.g. "\\frac{1}{2}" or "0.5"); the completion is
  parsed by math-verify (boxed answers first, then the last expression). 1.0 if equivalent, else 0.0.
- choice: sample["answer"] is a letter ("B", "(B)") or a 0-based index; optional sample["choices"] (list)
  limits the valid letters. The completion's answer is, in order of preference, the last \\boxed{X}, the last
  "answer is X" / "Answer: X", the last "(X)", or the whole completion when it is a single letter.
- logic (ZebraLogic grid mode): sample["solution"] (or "answer") is either {"header": [...], "rows": [[...]]}
  as in ZebraLogicBench, or already {"House 1": {"Name": "Alice", ...}, ...}. The completion must contain a
  JSON object (the last ```json block, else the last parseable {...}); when it has a "solution" key that is
  used (ZebraLogic's prompt asks for {"reasoning": ..., "solution": {...}}). The score is the fraction of
  cells right (ZebraLogic's cell accuracy; 1.0 only for the whole grid). Keys and values compare
  case-insensitively with whitespace collapsed. A completion without a parseable object scores 0.0.
"""

from __future__ import annotations

import json
import re
import threading

from megatron_sapo.rewards.registry import RewardError, register_reward


# ----------------------------------------------------------------------------------------------------------
# math
# ----------------------------------------------------------------------------------------------------------
def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise RewardError("the 'math' reward needs math-verify: pip install math-verify") from None
    return math_verify


@register_reward("math", required_fields=("answer",), description="math answer equivalence (math-verify)")
def math_reward(completion: str, sample: dict) -> float:
    mv = _math_verify()
    # math-verify's timeouts use SIGALRM, which only the main thread may set; pool workers go without.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    answer = str(sample["answer"]).strip()
    gold_text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
    gold = mv.parse(gold_text, parsing_timeout=timeout)
    if not gold:
        gold = mv.parse(answer, parsing_timeout=timeout)
    if not gold:
        raise RewardError(f"math: the reference answer {answer!r} could not be parsed by math-verify")
    pred = mv.parse(completion, parsing_timeout=timeout)
    if not pred:
        return 0.0
    return 1.0 if mv.verify(gold, pred, timeout_seconds=timeout) else 0.0


# ----------------------------------------------------------------------------------------------------------
# choice
# ----------------------------------------------------------------------------------------------------------
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _reference_letter(sample: dict, valid: str) -> str:
    ans = sample["answer"]
    if isinstance(ans, bool):
        raise RewardError(f"choice: sample['answer'] must be a letter or an index, got {ans!r}")
    if isinstance(ans, int):
        if not 0 <= ans < len(valid):
            raise RewardError(f"choice: answer index {ans} is outside the {len(valid)} choices")
        return valid[ans]
    letter = str(ans).strip().strip("()[]. ").upper()
    if len(letter) != 1 or letter not in valid:
        raise RewardError(f"choice: sample['answer'] {ans!r} is not one of the letters {valid}")
    return letter


def extract_choice(completion: str, valid: str = "ABCDEFGHIJ") -> str | None:
    """The answer letter a completion commits to (see the module docstring), or None."""
    cls = f"[{valid}]"
    patterns = (
        rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?({cls})\)?\s*\}}?\s*\}}",
        rf"[Aa]nswer\s*(?:is|:)?\s*(?:\*\*)?\s*[:\(\[]?\s*({cls})\b(?![a-z])",
        rf"\(({cls})\)",
    )
    for pat in patterns:
        found = re.findall(pat, completion)
        if found:
            return found[-1]
    bare = completion.strip().strip("*.()[]: ")
    return bare if len(bare) == 1 and bare in valid else None


@register_reward("choice", required_fields=("answer",), description="multiple-choice letter")
def choice_reward(completion: str, sample: dict) -> float:
    choices = sample.get("choices")
    valid = _LETTERS[: len(choices)] if isinstance(choices, (list, tuple)) and choices else _LETTERS[:10]
    gold = _reference_letter(sample, valid)
    return 1.0 if extract_choice(completion, valid) == gold else 0.0


# ----------------------------------------------------------------------------------------------------------
# logic (ZebraLogic grid)
# ----------------------------------------------------------------------------------------------------------
def _norm(x) -> str:
    return " ".join(str(x).split()).lower()


def _grid(obj, what: str) -> dict[str, dict[str, str]]:
    """Normalise a grid to {row key: {attribute: value}} with normalised strings."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise RewardError(f"logic: {what} is a string but not JSON: {e}") from None
    if isinstance(obj, dict) and "header" in obj and "rows" in obj:
        header = obj["header"]
        out = {}
        for row in obj["rows"]:
            if len(row) != len(header):
                raise RewardError(f"logic: {what} row {row!r} does not match the header {header!r}")
            out[_norm(f"{header[0]} {row[0]}")] = {_norm(h): _norm(v) for h, v in zip(header[1:], row[1:])}
        return out
    if isinstance(obj, dict) and all(isinstance(v, dict) for v in obj.values()):
        return {_norm(k): {_norm(a): _norm(v) for a, v in row.items()} for k, row in obj.items()}
    raise RewardError(f"logic: {what} is neither {{'header', 'rows'}} nor {{row: {{attribute: value}}}}: {obj!r:.200}")


def _last_json_object(text: str):
    blocks = re.findall(r"```(?:json)?\s*\n(.*?)```", text, flags=re.DOTALL)
    for block in reversed(blocks):
        try:
            return json.loads(block)
        except json.JSONDecodeError:
            continue
    decoder = json.JSONDecoder()
    best = None
    i = text.find("{")
    while i != -1:  # the last top-level object that parses
        try:
            obj, end = decoder.raw_decode(text, i)
            best = obj
            i = text.find("{", end)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
    return best


@register_reward("logic", required_fields=(), description="ZebraLogic grid, fraction of cells right")
def logic_reward(completion: str, sample: dict) -> float:
    if "solution" in sample:
        gold = _grid(sample["solution"], "sample['solution']")
    elif "answer" in sample:
        gold = _grid(sample["answer"], "sample['answer']")
    else:
        raise RewardError(f"logic: the sample needs a 'solution' (or 'answer') grid; it has {sorted(sample)}")
    cells = sum(len(row) for row in gold.values())
    if cells == 0:
        raise RewardError("logic: the reference grid has no cells")
    obj = _last_json_object(completion)
    if isinstance(obj, dict) and isinstance(obj.get("solution"), dict):
        obj = obj["solution"]
    try:
        pred = _grid(obj, "the completion's answer") if obj is not None else {}
    except RewardError:
        return 0.0  # a malformed answer is the model's fault: wrong, not a failure
    right = sum(pred.get(key, {}).get(attr) == value for key, row in gold.items() for attr, value in row.items())
    return right / cells
