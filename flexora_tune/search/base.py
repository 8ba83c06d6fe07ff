"""What every layer searcher here shares: metric/mode resolved the Tune way, the base config from Tune, the
model's block count, picklable save/restore, concurrency, and bookkeeping by what a trial *is*.

A searcher's state is keyed by a trial's identity (stage, seed, subset: what its config holds), never by trial
id alone, because `Tuner.restore` breaks ids: ``restart_errored=True`` re-runs a trial under a new id,
``resume_errored=True`` re-runs one whose id already completed, and ``resume_unfinished=False`` ends trials
without telling the searcher. Tune gives a searcher no view of its trials, so `tune_trials` reads them from
the `TuneController` that is asking: the only way to see, after a restore, which trials Tune will still run.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Hashable, Mapping
from typing import Any

from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.search import Searcher
from ray.tune.search.variant_generator import parse_spec_vars

from ..blocks import parse_blocks
from .encoding import LAYERS_KEY, decode_layers, num_blocks_of

#: Statuses of a trial Tune will still run (and report on).
LIVE_STATUSES = frozenset({Trial.PENDING, Trial.RUNNING, Trial.PAUSED})
#: Statuses of a trial Tune will not run again in this fit.
ENDED_STATUSES = frozenset({Trial.TERMINATED, Trial.ERROR})

Identity = tuple[Hashable, ...]


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


def resolve_metric_mode(owner: str, own_metric: str | None, own_mode: str | None, metric: str | None,
                        mode: str | None) -> tuple[str | None, str | None]:
    """The metric and mode a searcher runs with: its constructor's, else the TuneConfig's (as Ray's own searchers
    take them). A constructor value that disagrees with the TuneConfig's raises, naming both, before any trial."""
    check_mode(mode)
    own_metric = None if own_metric == DEFAULT_METRIC else own_metric
    metric = None if metric == DEFAULT_METRIC else metric
    for name, own, given in (("metric", own_metric, metric), ("mode", own_mode, mode)):
        if own is not None and given is not None and own != given:
            raise ValueError(
                f"{owner} was built with {name}={own!r} but the TuneConfig has {name}={given!r}: give the "
                f"{name} in one place (the TuneConfig is enough), or make the two agree"
            )
    return own_metric or metric, own_mode or mode


def tune_trials() -> list[Trial] | None:
    """The trials of the Tune run now asking this searcher (any status), or None when it is not called from
    Tune's loop (e.g. a searcher driven by hand).

    Tune asks a searcher through ``TuneController._update_trial_queue`` -> ``SearchGenerator.next_trial``, so the
    controller is a few frames up; its public `get_trials` lists every trial with its status and config.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, TuneController):
                return list(owner.get_trials())
            frame = frame.f_back
    finally:
        del frame
    return None


def subset_of(source: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The block subset a trial config (``layers`` dict) or result (``blocks`` "0,3") names, else None."""
    layers = source.get(LAYERS_KEY)
    if isinstance(layers, Mapping):
        try:
            return decode_layers(layers).blocks
        except ValueError:
            return None
    return parse_blocks(source.get("blocks")) or None


class PickledState:
    """Save/restore for a searcher whose whole state is its picklable ``__dict__`` (what `Tuner.restore` brings
    back). Tune's storage then holds pickled objects: keep it where only you can write."""

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


class LayerSearcher(PickledState, Searcher):
    """Base of the layer searchers: a `Searcher` whose whole state is its picklable ``__dict__``.

    `base_config` (e.g. ``{"model": ..., "task": ...}``) is merged under every suggestion; Tune also merges
    its own config, so it is only needed when the searcher is used outside Tune's config. The searcher limits
    concurrency itself (``max_concurrent_trials``), counting the trials Tune still runs, so a restore that ends
    or re-runs trials never leaves it waiting for a slot that will not free up.
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
        self._max_concurrent: int | None = None
        self._owned: dict[str, Identity] = {}
        self._open: set[str] = set()

    @property
    def label(self) -> str:
        """The ``strategy`` value this searcher's trials carry."""
        return self.strategy

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        check_resolved(config, type(self).__name__)
        self._metric, self._mode = resolve_metric_mode(type(self).__name__, self._metric, self._mode, metric, mode)
        self._tune_config = dict(config)
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Take Tune's ``max_concurrent_trials`` here rather than in a `ConcurrencyLimiter` (whose count of live
        trials a restore can leave stuck)."""
        self._max_concurrent = int(max_concurrent) if max_concurrent else None
        return True

    @property
    def num_blocks(self) -> int:
        """L, from the constructor or else read once from the config's model."""
        if self._num_blocks is None:
            config = {**self._base_config, **self._tune_config}
            self._num_blocks = num_blocks_of(config.get("model", "default"), bool(config.get("trust_remote_code")))
        return self._num_blocks

    def identity(self, source: Mapping[str, Any]) -> Identity | None:
        """What a trial of this searcher is, read from its config or a result: ``("finetune", blocks, seed)``;
        None for a trial this searcher did not make (e.g. another searcher's in the same experiment)."""
        if source.get("strategy") != self.label or source.get("stage", "finetune") != "finetune":
            return None
        return ("finetune", subset_of(source), source.get("seed"))

    def owns(self, trial: Trial) -> bool:
        return trial.trial_id in self._owned or self.identity(trial.config or {}) is not None

    def live_count(self, trials: list[Trial] | None) -> int:
        """This searcher's trials that Tune will still run (without Tune's view: those not yet completed)."""
        if trials is None:
            return len(self._open)
        return sum(1 for t in trials if t.status in LIVE_STATUSES and self.owns(t))

    def at_capacity(self, trials: list[Trial] | None) -> bool:
        return self._max_concurrent is not None and self.live_count(trials) >= self._max_concurrent

    def _suggestion(self, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
        full = {**self._base_config, **config}
        self._owned[trial_id] = self.identity(full) or ("finetune", None, full.get("seed"))
        self._open.add(trial_id)
        return full

    def _learn(self, trial_id: str, result: Mapping[str, Any] | None) -> Identity | None:
        """The identity of `trial_id`: known from a suggestion, or read from its result (a trial re-run under a
        new id by a restore). A result from a trial re-opens it (a completed trial that Tune re-runs)."""
        identity = self._owned.get(trial_id)
        if identity is None and result:
            identity = self.identity(result)
            if identity is not None:
                self._owned[trial_id] = identity
        return identity

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._learn(trial_id, result) is not None:
            self._open.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._learn(trial_id, result)
        self._open.discard(trial_id)

