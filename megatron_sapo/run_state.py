"""Run-folder bookkeeping for checkpoints: completion markers, `latest`, resume lookup, pruning.

A checkpoint folder counts only once its marker exists; the marker is written after every rank has
finished writing, and `latest` is replaced atomically, so a run killed mid-write resumes from the
previous complete checkpoint and never loads half a checkpoint.
"""

from __future__ import annotations

import os
import shutil

from megatron_sapo.config import ConfigError, InputError

MARKER = "COMPLETE"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def mark_complete(run_dir: str, path: str) -> None:
    with open(os.path.join(path, MARKER), "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    latest = os.path.join(checkpoints_dir(run_dir), "latest")
    with open(latest + ".tmp", "w") as f:
        f.write(os.path.basename(path) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest + ".tmp", latest)


def _step_of(name: str) -> int:
    return int(name.split("_", 1)[1]) if name.startswith("step_") and name[5:].isdigit() else -1


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if _step_of(n) >= 0), key=_step_of)
    return [os.path.join(root, n) for n in names if is_complete(os.path.join(root, n))]


def require_complete(path: str, what: str) -> str:
    """`path` if it is a complete checkpoint, else an InputError "<what> <path>: not a complete checkpoint"."""
    if not is_complete(path):
        raise InputError(f"{what} {path}: not a complete checkpoint (no {MARKER} marker)")
    return path


def find_resume_checkpoint(cfg) -> str | None:
    """checkpoint.resume: 'none', 'auto' (newest complete one in the run folder, if any), or a path."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode != "auto":
        if not is_complete(mode):
            raise ConfigError(
                f"checkpoint.resume={mode!r}: not a complete checkpoint (no {MARKER} marker); "
                "give 'auto', 'none' or the path of a complete checkpoint"
            )
        return mode
    found = complete_checkpoints(cfg.run.dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and incomplete leftovers."""
    complete = complete_checkpoints(run_dir)
    newest = _step_of(os.path.basename(complete[-1])) if complete else -1
    for path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    root = checkpoints_dir(run_dir)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if 0 <= _step_of(name) < newest and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)  # a write that was killed
