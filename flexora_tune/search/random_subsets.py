"""Uniform random block subsets (any size, or exactly k blocks): the baseline every search must beat."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

from ray.tune.search import Searcher

from .base import LayerSearcher, tune_trials
from .encoding import encode_layers


class RandomLayerSearcher(LayerSearcher):
    """Suggest seeded, distinct random subsets until `max_trials` (or every subset) has been tried.

    Without `k` every non-empty subset is equally likely; with `k` every subset of exactly `k` blocks is.
    `num_blocks` (L) defaults to the block count in the config's model. Fine-tunes use seed `trial_seed`.
    ``max_trials=T`` gives a comparison's equal arm: T distinct subsets (fewer only if the space has fewer).
    """

    strategy = "random"

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        k: int | None = None,
        seed: int = 0,
        trial_seed: int = 0,
        max_trials: int | None = None,
        num_blocks: int | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(metric, mode, num_blocks=num_blocks, base_config=base_config)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive int or None, got {k!r}")
        if max_trials is not None and max_trials < 1:
            raise ValueError(f"max_trials must be >= 1 or None, got {max_trials!r}")
        self._k, self._trial_seed, self._max_trials = k, int(trial_seed), max_trials
        self._rng = random.Random(seed)
        self._seen: set[tuple[int, ...]] = set()

    @property
    def label(self) -> str:
        return f"random{self._k}" if self._k else self.strategy

    @property
    def planned_trials(self) -> int | None:
        """The most trials this makes: `max_trials`, capped by the number of subsets once L is known."""
        if self._num_blocks is None:
            return self._max_trials
        size = self._space_size(self._num_blocks)
        return size if self._max_trials is None else min(size, self._max_trials)

    def _space_size(self, total: int) -> int:
        return math.comb(total, self._k) if self._k else 2**total - 1

    def _draw(self, total: int) -> tuple[int, ...]:
        if self._k:
            return tuple(sorted(self._rng.sample(range(total), self._k)))
        while True:
            subset = tuple(i for i in range(total) if self._rng.random() < 0.5)
            if subset:
                return subset

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        total = self.num_blocks
        if self._k and self._k > total:
            raise ValueError(f"k={self._k} exceeds the model's {total} blocks")
        budget = self._space_size(total)
        if self._max_trials is not None:
            budget = min(budget, self._max_trials)
        if len(self._seen) >= budget:
            return Searcher.FINISHED
        if self.at_capacity(tune_trials()):
            return None
        subset = self._draw(total)
        while subset in self._seen:
            subset = self._draw(total)
        self._seen.add(subset)
        config = {"stage": "finetune", "strategy": self.label, "seed": self._trial_seed,
                  "layers": encode_layers(subset, total)}
        return self._suggestion(trial_id, config)
