"""A deterministic, resumable sampler over several datasets mixed by weight.

    s = MixtureSampler(sizes=[1000, 200], weights=[0.7, 0.3], seed=1234)
    picks = s.take(32)              # [(dataset index, row index), ...]
    state = s.state_dict()          # JSON-able; put it in the checkpoint
    s2 = MixtureSampler([1000, 200], [0.7, 0.3], 1234); s2.load_state_dict(state)  # continues identically

Draw d picks its dataset with an RNG seeded by (seed, d) and the weights; each dataset is walked through a
permutation seeded by (seed, dataset, epoch), and a new permutation starts when one is used up. The state is
just counters, so resuming needs no RNG state and gives exactly the continuation of an uninterrupted run.
"""

from __future__ import annotations

import random


class MixtureSampler:
    def __init__(self, sizes: list[int], weights: list[float] | None = None, seed: int = 0):
        if not sizes:
            raise ValueError("MixtureSampler: no datasets")
        for i, n in enumerate(sizes):
            if n < 1:
                raise ValueError(f"MixtureSampler: dataset {i} is empty")
        if weights is None:
            weights = [float(n) for n in sizes]  # uniform over all rows
        if len(weights) != len(sizes):
            raise ValueError(f"MixtureSampler: {len(weights)} weights for {len(sizes)} datasets")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"MixtureSampler: weights must be >= 0 with a positive sum, got {weights}")
        self.sizes = list(sizes)
        self.seed = int(seed)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self._cum = [sum(self.weights[: i + 1]) for i in range(len(self.weights))]
        self.draws = 0
        self.cursors = [[0, 0] for _ in sizes]  # per dataset: [epoch, position in that epoch's permutation]
        self._perms: dict[int, tuple[int, list[int]]] = {}

    def _perm(self, ds: int, epoch: int) -> list[int]:
        cached = self._perms.get(ds)
        if cached is None or cached[0] != epoch:
            order = list(range(self.sizes[ds]))
            random.Random(f"{self.seed}:{ds}:{epoch}").shuffle(order)
            self._perms[ds] = cached = (epoch, order)
        return cached[1]

    def _pick_dataset(self) -> int:
        if len(self.sizes) == 1:
            return 0
        u = random.Random(f"{self.seed}:draw:{self.draws}").random()
        for i, c in enumerate(self._cum):
            if u < c:
                return i
        return max(i for i, w in enumerate(self.weights) if w > 0)  # u hit the rounding gap at the top

    def next(self) -> tuple[int, int]:
        ds = self._pick_dataset()
        self.draws += 1
        epoch, pos = self.cursors[ds]
        row = self._perm(ds, epoch)[pos]
        pos += 1
        if pos == self.sizes[ds]:
            epoch, pos = epoch + 1, 0
        self.cursors[ds] = [epoch, pos]
        return ds, row

    def take(self, k: int) -> list[tuple[int, int]]:
        return [self.next() for _ in range(k)]

    def epochs(self) -> list[float]:
        """Passes made over each dataset (fractional)."""
        return [e + p / n for (e, p), n in zip(self.cursors, self.sizes)]

    def state_dict(self) -> dict:
        return {
            "draws": self.draws,
            "cursors": [list(c) for c in self.cursors],
            "sizes": list(self.sizes),
            "weights": list(self.weights),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Raises ValueError when it was made for other datasets, weights or seed
        (resuming then would silently change the prompt stream)."""
        for key, mine in (("sizes", self.sizes), ("seed", self.seed)):
            if state.get(key) != mine:
                raise ValueError(
                    f"sampler state mismatch: the checkpoint has {key}={state.get(key)}, this run has {mine} "
                    "(the datasets, max_prompt_len or seed changed since the checkpoint)"
                )
        theirs = state.get("weights", [])
        if len(theirs) != len(self.weights) or any(abs(a - b) > 1e-12 for a, b in zip(theirs, self.weights)):
            raise ValueError(f"sampler state mismatch: the checkpoint has weights={theirs}, this run {self.weights}")
        self.draws = int(state["draws"])
        self.cursors = [[int(e), int(p)] for e, p in state["cursors"]]
