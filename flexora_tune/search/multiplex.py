"""A whole comparison as one Tune experiment: `ArmsSearcher` multiplexes independent per-arm searchers (one per
strategy and seed), so every arm's trials are in flight together and every slot of the cluster stays busy.

Arms stay independent: each arm's searcher sees only its own trials' results (a TPE arm never learns from a
random arm's fine-tunes), and nothing here compares trials across arms. An arm that needs Flexora's subset size
(`Deferred`) is built as soon as that seed's Flexora search reports its selection. `ArmBudgetStopper` stops a
running trial once its arm's compute (FLOPs or seconds) reaches the arm's budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from ..blocks import parse_blocks
from ..results import ARM, FLOPS
from .base import LIVE_STATUSES, PickledState, check_mode, resolve_metric_mode, tune_trials

logger = logging.getLogger(__name__)

COMPUTE_S = "compute_s"


def arm_name(strategy: str, seed: int) -> str:
    """``"<strategy>_seed<seed>"``: the name of an arm, its ``config["arm"]`` and its old experiment's name."""
    return f"{strategy}_seed{seed}"


def parse_arm(name: str) -> tuple[str, int]:
    """(strategy, seed) of an `arm_name`."""
    strategy, sep, seed = name.rpartition("_seed")
    if not sep or not strategy or not seed.isdigit():
        raise ValueError(f"not an arm name like 'random_seed0': {name!r}")
    return strategy, int(seed)


@dataclass(frozen=True)
class Deferred:
    """An arm whose searcher needs the subset size k that the Flexora arm `after` selects: ``factory(k=k)`` is
    called when that arm's search reports its final selection (k = the selection's size), or with `fallback_k`
    when the arm finishes without one (its search failed); with no `fallback_k` the arm is then dropped.
    `factory` must pickle (a class or module-level function, or a `functools.partial` of one), since Tune
    pickles the searcher. `planned_trials` is what the built arm will make, for `ArmsSearcher.planned_trials`."""

    factory: Callable[..., Searcher]
    after: str
    fallback_k: int | None = None
    planned_trials: int | None = None


def arm_of_result(result: Mapping[str, Any] | None) -> str | None:
    """The arm a result names: its ``arm`` key, or its config's (flattened ``config/arm`` as searchers receive
    results, or nested as stoppers and callbacks do)."""
    if not result:
        return None
    config = result.get("config")
    nested = config.get(ARM) if isinstance(config, Mapping) else None
    name = result.get(ARM) or result.get(f"config/{ARM}") or nested
    return name if isinstance(name, str) else None


def _amount(result: Mapping[str, Any] | None, key: str) -> float | None:
    value = (result or {}).get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class ArmsSearcher(PickledState, Searcher):
    """One searcher for many independent arms: `arms` maps an arm's name (e.g. ``"random_seed0"``) to its
    searcher, or to a `Deferred` one.

    - `suggest` asks the built, unfinished arms of the earliest seed first (arms named by `arm_name`; others
      count as one seed), least-served first within a seed (ties in the order given), and tags the config with
      ``config["arm"] = name`` (`results.ARM`; the arm's searcher already sets strategy and seed). When slots
      are scarce, seeds thus complete one after another, so a comparison cut short (Ctrl-C, a budget, a lost
      driver) holds whole seeds that pair across strategies, not one trial of every arm.
      It returns None while some arm is waiting (a Flexora arm for its search, a deferred arm for its k) and
      `FINISHED` once every arm has returned `FINISHED` (or spent its budget).
    - Results and completions go to the arm that suggested the trial, found by trial id, else by the result's
      or Tune's config ``arm`` (a trial a `Tuner.restore` re-runs under a new id). Others are ignored.
    - Budgets per arm (optional): `budget_flops` and `budget_s` bound the arm's spent compute, the sum over its
      trials of their latest ``flops`` / ``compute_s``. An arm that reached one gets no new trial;
      `ArmBudgetStopper` stops the trial whose report makes its arm reach it.
    - ``max_concurrent_trials`` is taken here (`set_max_concurrency` returns True), counting the trials Tune
      still runs, as the layer searchers do; arms are not limited individually.
    - Metric and mode: the constructor's or the TuneConfig's (a conflict raises), passed to every arm (a deferred
      one when it is built) with Tune's config once Tune gives it (`set_search_properties`, called only with a
      non-empty param space), or with an empty config before that. An arm built with a conflicting metric or
      mode raises, naming both.
    - `save`/`restore` pickle the whole multiplexer (every arm, what each was told, the spend), so
      `Tuner.restore` continues the whole comparison.
    """

    def __init__(
        self,
        arms: Mapping[str, Searcher | Deferred],
        metric: str | None = None,
        mode: str | None = None,
        *,
        budget_flops: float | None = None,
        budget_s: float | None = None,
    ) -> None:
        check_mode(mode)
        super().__init__(metric=metric, mode=mode)
        if not arms:
            raise ValueError("ArmsSearcher needs at least one arm")
        for name, arm in arms.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"arm names must be non-empty strings, got {name!r}")
            if isinstance(arm, Deferred):
                if arm.after not in arms or isinstance(arms[arm.after], Deferred):
                    raise ValueError(f"arm {name!r} waits for arm {arm.after!r}, which is not a built arm here")
            elif not isinstance(arm, Searcher):
                raise TypeError(f"arm {name!r} must be a ray.tune.search.Searcher or a Deferred, got {type(arm)}")
        for label, budget in (("budget_flops", budget_flops), ("budget_s", budget_s)):
            if budget is not None and not (isinstance(budget, int | float) and 0 < budget < math.inf):
                raise ValueError(f"{label} must be a positive number or None, got {budget!r}")
        self._order = list(arms)
        self._arms: dict[str, Searcher] = {n: a for n, a in arms.items() if not isinstance(a, Deferred)}
        self._pending: dict[str, Deferred] = {n: a for n, a in arms.items() if isinstance(a, Deferred)}
        self._budgets = {FLOPS: budget_flops, COMPUTE_S: budget_s}
        self._built_k: dict[str, int] = {}
        self._selection_k: dict[str, int] = {}
        self._finished: set[str] = set()
        self._owner: dict[str, str] = {}
        self._served: dict[str, int] = dict.fromkeys(self._order, 0)
        self._open: set[str] = set()
        self._spent: dict[str, dict[str, dict[str, float]]] = {name: {} for name in self._order}
        self._props: tuple[str | None, str | None, dict[str, Any], dict[str, Any]] | None = None
        self._max_concurrent: int | None = None
        for arm in self._arms.values():
            self._tell_properties(arm)

    @property
    def arms(self) -> dict[str, Searcher]:
        """The arms built so far, by name (deferred ones appear once released)."""
        return dict(self._arms)

    @property
    def waiting(self) -> list[str]:
        """Deferred arms not built yet."""
        return list(self._pending)

    @property
    def finished_arms(self) -> list[str]:
        return [name for name in self._order if name in self._finished]

    @property
    def released_k(self) -> dict[str, int]:
        """The k each deferred arm was built with."""
        return dict(self._built_k)

    @property
    def planned_trials(self) -> int | None:
        """The sum of every arm's `planned_trials` (a deferred arm's as declared), or None when one is unknown:
        give it to Tune as ``num_samples`` (with None, ``num_samples=-1`` and the arms end the sweep)."""
        counts = [getattr(self._arms.get(n) or self._pending.get(n), "planned_trials", None) for n in self._order]
        return None if any(c is None for c in counts) else sum(counts)

    def trials_of(self, name: str) -> list[str]:
        """Trial ids routed to arm `name` so far."""
        return [trial_id for trial_id, owner in self._owner.items() if owner == name]

    def spent(self, name: str) -> dict[str, float]:
        """Arm `name`'s compute so far: ``{"flops": ..., "compute_s": ...}`` summed over its trials' latest reports."""
        return {key: sum(t.get(key, 0.0) for t in self._spent[name].values()) for key in self._budgets}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        self._metric, self._mode = resolve_metric_mode(type(self).__name__, self._metric, self._mode, metric, mode)
        self._props = (self._metric, self._mode, dict(config), dict(spec))
        for arm in self._arms.values():
            self._tell_properties(arm)
        return True

    def _tell_properties(self, arm: Searcher) -> None:
        """Give `arm` the metric, mode and config: Tune's, or before Tune gave them, this searcher's own."""
        if self._props is not None:
            metric, mode, config, spec = self._props
            arm.set_search_properties(metric, mode, dict(config), **spec)
        elif self._metric or self._mode:
            arm.set_search_properties(self._metric, self._mode, {})

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._max_concurrent = int(max_concurrent) if max_concurrent else None
        return True

    def _live(self, name: str | None = None) -> int:
        """Trials Tune will still run, of arm `name` or of every arm (without Tune's view: suggested or
        reporting and not completed)."""
        trials = tune_trials()
        if trials is None:
            return sum(1 for t in self._open if name is None or self._owner.get(t) == name)
        owners = ((self._owner.get(t.trial_id) or (t.config or {}).get(ARM)) for t in trials
                  if t.status in LIVE_STATUSES)
        return sum(1 for owner in owners if owner in self._served and (name is None or owner == name))

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._release()
        if self._max_concurrent is not None and self._live() >= self._max_concurrent:
            return None
        while True:
            ready = [n for n in self._order if n in self._arms and n not in self._finished]
            for name in sorted(ready, key=lambda n: (_arm_seed(n), self._served[n])):
                if self.over_budget(name):
                    logger.info("arm %s reached its budget (%s); it gets no new trial", name, self.spent(name))
                    self._finished.add(name)
                    continue
                config = self._arms[name].suggest(trial_id)
                if config == Searcher.FINISHED:
                    self._finished.add(name)
                elif config is not None:
                    self._owner[trial_id] = name
                    self._served[name] += 1
                    self._open.add(trial_id)
                    return {**config, ARM: name}
            if not self._release():  # an arm that just finished may release others: ask again if it did
                break
        if not self._pending and all(n in self._finished for n in self._arms):
            return Searcher.FINISHED
        return None

    def _release(self) -> bool:
        """Build each deferred arm whose k is known: its Flexora arm reported a selection, or finished without one
        and with no trial left running (then `fallback_k`). True when an arm was built or dropped."""
        changed = False
        for name, spec in list(self._pending.items()):
            k = self._selection_k.get(spec.after)
            if k is None and spec.after in self._finished and not self._live(spec.after):
                k = spec.fallback_k
                if k is None:
                    logger.warning("arm %s is dropped: arm %s finished without a selection to size it", name,
                                   spec.after)
                    del self._pending[name]
                    self._finished.add(name)
                    changed = True
                    continue
            if k is None:
                continue
            arm = spec.factory(k=k)
            self._tell_properties(arm)
            del self._pending[name]
            self._arms[name], self._built_k[name] = arm, k
            changed = True
        return changed

    def _route(self, trial_id: str, result: Mapping[str, Any] | None) -> str | None:
        name = self._owner.get(trial_id) or arm_of_result(result)
        if name is None:
            trial = next((t for t in tune_trials() or [] if t.trial_id == trial_id), None)
            name = (trial.config or {}).get(ARM) if trial is not None else None
        if name not in self._arms:
            return None
        self._owner[trial_id] = name
        return name

    def _record(self, name: str, trial_id: str, result: Mapping[str, Any] | None) -> None:
        amounts = {key: v for key in self._budgets if (v := _amount(result, key)) is not None}
        if amounts:
            self._spent[name].setdefault(trial_id, {}).update(amounts)
        if result and result.get("stage") == "search" and result.get("final") is True and name not in self._selection_k:
            blocks = parse_blocks(result.get("blocks"))
            if blocks:
                self._selection_k[name] = len(blocks)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        name = self._route(trial_id, result)
        if name is None:
            return
        self._open.add(trial_id)
        self._record(name, trial_id, result)
        self._arms[name].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        name = self._route(trial_id, result)
        if name is None:
            return
        self._open.discard(trial_id)
        self._record(name, trial_id, result)
        self._arms[name].on_trial_complete(trial_id, result=result, error=error)

    def over_budget(self, name: str, trial_id: str | None = None, result: Mapping[str, Any] | None = None) -> bool:
        """Whether arm `name` has reached a budget: its trials' latest spend, with `result` as `trial_id`'s latest."""
        spent = {k: dict(v) for k, v in self._spent[name].items()}
        if trial_id is not None:
            spent.setdefault(trial_id, {}).update(
                {key: v for key in self._budgets if (v := _amount(result, key)) is not None})
        return any(budget is not None and sum(t.get(key, 0.0) for t in spent.values()) >= budget
                   for key, budget in self._budgets.items())

    def exceeds_budget(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        """Whether `result`, a report of running trial `trial_id`, brings its arm to a budget (for the stopper)."""
        name = self._route(trial_id, result)
        return name is not None and self.over_budget(name, trial_id, result)



class ArmBudgetStopper(Stopper):
    """Stops a running trial once its arm's compute (its finished trials plus the running ones' latest reports,
    this one's included) reaches the arm's `budget_flops` or `budget_s` in `searcher`. Give it to
    ``RunConfig(stop=...)`` with the same `ArmsSearcher` as the TuneConfig's ``search_alg``: it reads the
    searcher's spend, which `Tuner.restore` brings back, so a resumed comparison keeps its budgets."""

    def __init__(self, searcher: ArmsSearcher) -> None:
        self._arms_searcher = searcher

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self._arms_searcher.exceeds_budget(trial_id, result)

    def stop_all(self) -> bool:
        return False


def _arm_seed(name: str) -> int:
    """The seed of an `arm_name` (0 for other names), for `ArmsSearcher.suggest`'s seed-first order; derived
    from the name, so a multiplexer pickled by an earlier version restores unchanged."""
    try:
        return parse_arm(name)[1]
    except ValueError:
        return 0
