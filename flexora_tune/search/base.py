"""What every layer searcher here shares: metric/mode from the constructor, the base config from Tune,
the model's block count, picklable save/restore, and tolerant bookkeeping of trial completions."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.variant_generator import parse_spec_vars

from .encoding import num_blocks_of


def check_mode(mode: str | None) -> None:
    if mode not in (None, "min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def check_resolved(config: Mapping[str, Any], owner: str) -> None:
    """Layer searchers propose only the subset; other search-space domains would reach the trainable raw."""
    _, domains, grids = parse_spec_vars(dict(config))
    if domains or grids:
        names = ["/".join(map(str, path)) for path, _ in [*domains, *grids]]
        raise ValueError(
            f"{owner} proposes block subsets only; the config has search-space domains {names}. Fix those "
            "values, or use tpe_searcher / OptunaSearch for other hyperparameters."
        )


class LayerSearcher(Searcher):
    """Base of the layer searchers: a `Searcher` whose whole state is its picklable ``__dict__``.

    `base_config` (e.g. ``{"model": ..., "task": ...}``) is merged under every suggestion; Tune also merges
    its own config, so it is only needed when the searcher is used outside Tune's config.
    """

    strategy = "layers"

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        num_blocks: int | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        check_mode(mode)
        super().__init__(metric=metric, mode=mode)
        if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int)
                                       or num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self._num_blocks = num_blocks
        self._base_config = dict(base_config or {})
        self._tune_config: dict[str, Any] = {}
        self._live: dict[str, Any] = {}
        self._finished_ids: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        check_mode(mode)
        check_resolved(config, type(self).__name__)
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        self._tune_config = dict(config)
        return True

    @property
    def num_blocks(self) -> int:
        """L, from the constructor or else read once from the config's model."""
        if self._num_blocks is None:
            model = {**self._base_config, **self._tune_config}.get("model", "default")
            self._num_blocks = num_blocks_of(model)
        return self._num_blocks

    def _suggestion(self, trial_id: str, token: Any, config: dict[str, Any]) -> dict[str, Any]:
        self._live[trial_id] = token
        return {**self._base_config, **config}

    def _complete(self, trial_id: str) -> Any:
        """The token a completed trial was suggested with; None for unknown or repeated ids."""
        if trial_id in self._finished_ids:
            return None
        self._finished_ids.add(trial_id)
        return self._live.pop(trial_id, None)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._complete(trial_id)

    def get_state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
