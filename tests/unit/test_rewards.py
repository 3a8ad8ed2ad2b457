"""Reward registry, verifiers (math, choice, logic, code, synthetic) and the batch scorer."""

from __future__ import annotations

import math
import threading
import time

import pytest

from megatron_sapo.rewards import (
    REWARDS,
    RewardError,
    compute_reward,
    extract_choice,
    extract_program,
    register_reward,
    score_batch,
    shaped_match,
)

# ---- test-only verifiers -------------------------------------------------------------------------------
_active = {"now": 0, "max": 0}
_lock = threading.Lock()


@register_reward("test_raise")
def _raise(completion, sample):
    raise ZeroDivisionError(f"bad completion {completion!r}")


@register_reward("test_nan")
def _nan(completion, sample):
    return float("nan")


@register_reward("test_slow")
def _slow(completion, sample):
    with _lock:
        _active["now"] += 1
        _active["max"] = max(_active["max"], _active["now"])
    time.sleep(float(sample.get("sleep", 0.05)))
    with _lock:
        _active["now"] -= 1
    return 1.0


@register_reward("test_str")
def _returns_text(completion, sample):
    return "1.0"


# ---- registry ------------------------------------------------------------------------------------------
def test_registry_lists_the_tasks_and_names_valid_ones_on_error():
    for name in ("math", "code", "logic", "choice", "copy", "reverse", "add"):
        assert name in REWARDS
    with pytest.raises(RewardError) as e:
        compute_reward("maths", "1", {"answer": "1"})
    assert "'maths'" in str(e.value) and "math" in str(e.value) and "choice" in str(e.value)


def test_missing_field_and_bad_return_type_name_the_culprit():
    with pytest.raises(RewardError, match=r"'math' needs field\(s\) \['answer'\]"):
        compute_reward("math", r"\boxed{1}", {"question": "1+0?"})
    with pytest.raises(RewardError, match="'test_str' returned str"):
        compute_reward("test_str", "x", {})
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(lambda c, s: 0.0)


# ---- math ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (r"So the result is \boxed{\frac{1}{2}}.", "0.5", 1.0),
        (r"The answer is $\boxed{0.5}$", r"\frac12", 1.0),
        (r"Hence $x = 2\sqrt{2}$, i.e. \boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"\boxed{1/3}", "0.5", 0.0),
        ("I do not know.", "7", 0.0),
        (r"Final: \boxed{42}", 42, 1.0),
    ],
)
def test_math(completion, answer, expected):
    assert compute_reward("math", completion, {"answer": answer}) == expected


def test_math_unparseable_reference_is_an_error():
    with pytest.raises(RewardError, match="reference answer"):
        compute_reward("math", r"\boxed{1}", {"answer": ""})


# ---- choice --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Let me think... (A) is wrong. The answer is (C).", "C"),
        (r"so \boxed{B}", "B"),
        ("Answer: D", "D"),
        ("  b ", None),
        ("B.", "B"),
        ("There is no answer here", None),
    ],
)
def test_extract_choice(completion, expected):
    assert extract_choice(completion, "ABCD") == expected


def test_choice_reward_letter_index_and_valid_range():
    assert compute_reward("choice", "The answer is (C).", {"answer": "C"}) == 1.0
    assert compute_reward("choice", "The answer is (C).", {"answer": "(B)"}) == 0.0
    assert compute_reward("choice", "Answer: B", {"answer": 1, "choices": ["x", "y", "z"]}) == 1.0
    with pytest.raises(RewardError, match="not one of the letters ABC"):
        compute_reward("choice", "Answer: B", {"answer": "E", "choices": ["x", "y", "z"]})


# ---- logic ---------------------------------------------------------------------------------------------
GRID = {"header": ["House", "Name", "Pet"], "rows": [["1", "Alice", "cat"], ["2", "Bob", "dog"]]}


def test_logic_cell_accuracy_both_formats():
    full = (
        '```json\n{"reasoning": "...", "solution": {"House 1": {"Name": "alice", "Pet": "Cat"}, '
        '"House 2": {"Name": "Bob", "Pet": "dog"}}}\n```'
    )
    assert compute_reward("logic", full, {"solution": GRID}) == 1.0
    half = 'Thus {"solution": {"House 1": {"Name": "Bob", "Pet": "cat"}, "House 2": {"Name": "Alice", "Pet": "dog"}}}'
    assert compute_reward("logic", half, {"solution": GRID}) == 0.5
    as_dict = {"House 1": {"Name": "Alice", "Pet": "cat"}, "House 2": {"Name": "Bob", "Pet": "dog"}}
    assert compute_reward("logic", half, {"answer": as_dict}) == 0.5
    assert compute_reward("logic", "no json at all", {"solution": GRID}) == 0.0
    assert compute_reward("logic", '{"solution": [1, 2]}', {"solution": GRID}) == 0.0


def test_logic_bad_reference_is_an_error():
    with pytest.raises(RewardError, match="does not match the header"):
        compute_reward("logic", "{}", {"solution": {"header": ["House", "Name"], "rows": [["1"]]}})
    with pytest.raises(RewardError, match="needs a 'solution'"):
        compute_reward("logic", "{}", {"question": "?"})


# ---- code ----------------------------------------------------------------------------------------------
TESTS = [{"input": "2\n", "output": "4\n"}, {"input": "3\n", "output": "9"}, {"input": "-1", "output": "1"}]


def _code(program: str) -> str:
    return f"First a draft:\n```python\nprint('draft')\n```\nFinal:\n```python\n{program}\n```\nDone."


def test_extract_program_takes_the_last_python_block():
    assert extract_program(_code("x = 1")).strip() == "x = 1"
    assert extract_program("```python\nunterminated") is None
    assert extract_program("```js\nconsole.log(1)\n```") is None


def test_code_reward_fraction_of_tests():
    assert compute_reward("code", _code("n = int(input())\nprint(n * n)"), {"tests": TESTS}) == 1.0
    partial = compute_reward("code", _code("n = int(input())\nprint(n * n if n > 0 else 0)"), {"tests": TESTS})
    assert partial == pytest.approx(2 / 3)
    assert compute_reward("code", _code("print(4)"), {"tests": TESTS}) == pytest.approx(1 / 3)
    assert compute_reward("code", _code("def f(:\n  pass"), {"tests": TESTS}) == 0.0  # syntax error
    assert compute_reward("code", _code("raise SystemExit(3)"), {"tests": TESTS}) == 0.0
    assert compute_reward("code", "no code block", {"tests": TESTS}) == 0.0


def test_code_reward_bad_tests_are_errors():
    with pytest.raises(RewardError, match="non-empty list"):
        compute_reward("code", _code("print(1)"), {"tests": []})
    with pytest.raises(RewardError, match=r"tests'\]\[1\]"):
        compute_reward("code", _code("print(1)"), {"tests": [{"input": "", "output": "1"}, {"stdin": ""}]})


# ---- synthetic -----------------------------------------------------------------------------------------
def test_shaped_match_orders_policies():
    answer = "4821"
    perfect = shaped_match("4821", answer)
    permuted = shaped_match("1248", answer)
    digits = shaped_match("7777", answer)
    too_long = shaped_match("48219999", answer)
    garbage = shaped_match("zz?", answer)
    assert perfect == 1.0
    assert perfect > too_long > permuted > digits > garbage == 0.0
    assert digits == pytest.approx(0.8 * 0.25 + 0.2)
    assert compute_reward("reverse", " 4821\n", {"answer": answer}) == 1.0
    with pytest.raises(RewardError, match="empty"):
        shaped_match("1", "")


# ---- batch scoring -------------------------------------------------------------------------------------
def test_score_batch_counts_failures_and_reports_nan():
    tasks = ["copy", "test_raise", "test_nan", "nope", "math"]
    completions = ["12", "x", "x", "x", r"\boxed{2}"]
    samples = [{"answer": "12"}, {}, {}, {}, {"answer": "2"}]
    res = score_batch(tasks, completions, samples, max_workers=3)
    assert res.rewards[0] == 1.0 and res.rewards[4] == 1.0
    assert res.failed == [1, 3] and res.rewards[1] == 0.0 and res.rewards[3] == 0.0
    assert "ZeroDivisionError" in res.errors[1] and "valid tasks" in res.errors[3]
    assert res.nan == [2] and math.isnan(res.rewards[2])
    m = res.metrics()
    assert m["reward/failures"] == 2 and m["reward/nan"] == 1
    assert m["reward/copy/mean"] == 1.0 and "reward/test_nan/mean" not in m


def test_score_batch_bounds_concurrency_and_times_out():
    _active["max"] = 0
    res = score_batch(["test_slow"] * 6, [""] * 6, [{}] * 6, max_workers=2)
    assert res.rewards == [1.0] * 6 and _active["max"] == 2
    res = score_batch(["test_slow", "copy"], ["", "1"], [{"sleep": 2.0}, {"answer": "1"}], timeout_s=0.3)
    assert res.failed == [0] and "TimeoutError" in res.errors[0] and res.rewards[1] == 1.0
    with pytest.raises(ValueError, match="same length"):
        score_batch(["copy"], [], [{}])


def test_score_batch_runs_code_concurrently():
    programs = [_code("n = int(input())\nprint(n * n)"), _code("print(0)")] * 2
    res = score_batch(["code"] * 4, programs, [{"tests": TESTS}] * 4, max_workers=4)
    assert res.rewards == [1.0, 0.0, 1.0, 0.0] and not res.failed
