"""Prompt datasets: JSONL (one JSON object per line), Parquet (needs pyarrow) and Hugging Face `datasets`,
checked row by row.

    rows = load_prompt_file("data/math.jsonl", prompt_key="prompt")
    rows[0]  # {"prompt": ..., "answer": ..., "task": "math", ...}; rows[i]["_line"] = where it came from

With the `datasets` library installed, a path can also be
    hf:NAME[:CONFIG][@SPLIT]   datasets.load_dataset(NAME, CONFIG, split=SPLIT or "train"): a hub name (cached
                               or online) or a local folder of data files
    a folder written by Dataset.save_to_disk (it holds dataset_info.json): datasets.load_from_disk

Each row needs the prompt field (a non-empty string, or a list of chat messages {"role", "content"}), a
"task" naming a registered reward (or a default task for the file), and the fields that task's verifier
needs (e.g. "answer" for math, "tests" for code). Every error names the file, the line (JSONL) or row
(Parquet, 1-based), and the field.
"""

from __future__ import annotations

import json
import os

from megatron_sapo.config import InputError
from megatron_sapo.rewards import REWARDS, missing_fields

WHERE_KEY = "_line"  # "file, line N" / "file, row N", kept on each row for later messages


class DataError(InputError):
    """A problem with a prompt dataset; the message names the file, line or row, and field."""


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            row[WHERE_KEY] = f"{path}, line {lineno}"
            rows.append(row)
    return rows


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows, start=1):
        row[WHERE_KEY] = f"{path}, row {i}"
    return rows


HF_PREFIX = "hf:"


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][@SPLIT]' -> (NAME, CONFIG or None, SPLIT, default 'train')."""
    body, _, split = spec[len(HF_PREFIX) :].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:openai/gsm8k:main@train")
    return name, config or None, split or "train"


def _read_hf(path: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: Hugging Face datasets need the datasets library (pip install datasets)") from None
    try:
        if path.startswith(HF_PREFIX):
            name, config, split = parse_hf_spec(path)
            table = datasets.load_dataset(name, config, split=split)
        else:
            table = datasets.load_from_disk(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (missing split, offline, bad files)
        raise DataError(f"{path}: datasets could not load it ({type(e).__name__}: {e})") from None
    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"{path}: holds several splits ({', '.join(table)}); name one: hf:<folder>@<split>")
    rows = table.to_list()
    for i, row in enumerate(rows, start=1):
        row[WHERE_KEY] = f"{path}, row {i}"
    return rows


def read_rows(path: str) -> list[dict]:
    """All rows of a .jsonl/.json-lines or .parquet file, an hf: spec or a save_to_disk folder, each tagged
    with WHERE_KEY. Raises DataError."""
    is_saved_dataset = os.path.isfile(os.path.join(path, "dataset_info.json"))
    if path.startswith(HF_PREFIX) or is_saved_dataset:
        rows = _read_hf(path)
        if not rows:
            raise DataError(f"{path}: the dataset is empty (no rows)")
        return rows
    if not os.path.isfile(path):
        raise DataError(f"prompt dataset not found: {path}")
    lower = path.lower()
    if lower.endswith((".jsonl", ".jsonl.txt", ".ndjson", ".json")):
        rows = _read_jsonl(path)
    elif lower.endswith((".parquet", ".pq")):
        rows = _read_parquet(path)
    else:
        raise DataError(
            f"{path}: unknown dataset format; use .jsonl / .ndjson / .json (one JSON object per line), "
            f".parquet / .pq, a datasets save_to_disk folder, or {HF_PREFIX}NAME[:CONFIG][@SPLIT]"
        )
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    return rows


def _check_prompt(value, where: str, key: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty")
        return
    if isinstance(value, list) and value:
        for j, msg in enumerate(value):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise DataError(f"{where}: field '{key}' message {j} must be {{'role': ..., 'content': ...}}")
        return
    raise DataError(f"{where}: field '{key}' must be a non-empty string or a list of chat messages")


def validate_rows(rows: list[dict], prompt_key: str = "prompt", default_task: str | None = None) -> list[dict]:
    """Check every row (see the module docstring); sets row["task"] from default_task where absent."""
    for row in rows:
        where = row.get(WHERE_KEY, "a prompt row")
        if prompt_key not in row:
            fields = ", ".join(k for k in row if k != WHERE_KEY)
            raise DataError(f"{where}: missing field '{prompt_key}' (the prompt; data.prompt_key); it has: {fields}")
        _check_prompt(row[prompt_key], where, prompt_key)
        task = row.get("task", default_task)
        if task is None:
            raise DataError(f"{where}: missing field 'task' (one of {', '.join(REWARDS.names())})")
        if task not in REWARDS:
            raise DataError(f"{where}: field 'task' is {task!r}, not one of {', '.join(REWARDS.names())}")
        row["task"] = task
        missing = missing_fields(task, row)
        if missing:
            raise DataError(f"{where}: missing field '{missing[0]}' (needed by task '{task}')")
        if "images" in row and row["images"] is not None and not isinstance(row["images"], list):
            raise DataError(f"{where}: field 'images' must be a list (of paths, URLs or image dicts)")
    return rows


def load_prompt_file(path: str, prompt_key: str = "prompt", default_task: str | None = None) -> list[dict]:
    """read_rows + validate_rows."""
    return validate_rows(read_rows(path), prompt_key=prompt_key, default_task=default_task)
