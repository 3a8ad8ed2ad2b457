"""Progress bars for rollout and updates.

A bar is drawn only when asked for (logging.progress) and stderr is a terminal: SLURM logs and CI output
stay line-based (tqdm's disable=None does the terminal check). Without tqdm installed, bars are no-ops.
"""

from __future__ import annotations

import contextlib


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0):
    """A tqdm bar (or a no-op with the same methods) that is closed on exit, errors included. Print through
    `bar.write(text)` while it is open, so console lines don't tear the bar."""
    bar = _NoBar()
    if enabled:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total, desc=desc, unit=unit, initial=initial, leave=False, dynamic_ncols=True, disable=None
            )
        except ImportError:
            pass
    try:
        yield bar
    finally:
        bar.close()
