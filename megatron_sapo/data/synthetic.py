"""Synthetic verifiable tasks for the tiny CPU recipe (scored by megatron_sapo.rewards.synthetic).

    rows = make_synthetic_rows("copy", n=1024, seed=0)
    rows[0]  # {"prompt": "copy:4821=", "answer": "4821", "task": "copy"}

- copy:    "copy:<digits>="    -> the digits
- reverse: "reverse:<digits>=" -> the digits reversed
- add:     "add:<a>+<b>="      -> a + b in decimal
Digit strings have min_len..max_len characters (default 3-5; for add, the operands). Every character is
in the tiny tokenizer's alphabet. Deterministic in (task, n, seed, lengths).
"""

from __future__ import annotations

import json
import random

SYNTHETIC_TASKS = ("copy", "reverse", "add")


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def make_synthetic_row(task: str, rng: random.Random, min_len: int = 3, max_len: int = 5) -> dict:
    if task == "copy":
        s = _digits(rng, min_len, max_len)
        return {"prompt": f"copy:{s}=", "answer": s, "task": task}
    if task == "reverse":
        s = _digits(rng, min_len, max_len)
        return {"prompt": f"reverse:{s}=", "answer": s[::-1], "task": task}
    if task == "add":
        a = rng.randint(0, 10 ** rng.randint(1, max(1, max_len - 2)) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, max(1, max_len - 2)) - 1)
        return {"prompt": f"add:{a}+{b}=", "answer": str(a + b), "task": task}
    raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(SYNTHETIC_TASKS)}")


def make_synthetic_rows(task: str, n: int, seed: int = 0, min_len: int = 3, max_len: int = 5) -> list[dict]:
    """n rows {prompt, answer, task}; `task` may also be "mix" (the three tasks in turn)."""
    if n < 1:
        raise ValueError(f"synthetic dataset: n must be >= 1, got {n}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"synthetic dataset: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if task != "mix" and task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(SYNTHETIC_TASKS)}, mix")
    rng = random.Random(f"megatron_sapo.synthetic:{task}:{seed}")
    tasks = SYNTHETIC_TASKS if task == "mix" else (task,)
    return [make_synthetic_row(tasks[i % len(tasks)], rng, min_len, max_len) for i in range(n)]


def write_jsonl(rows: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
