"""TPE over block subsets, on Optuna's public ask/tell API: this searcher owns an `optuna.Study` (in memory,
pickled with the searcher) and asks it for one subset per trial.

Why not Ray's `OptunaSearch`: its private attributes (``_setup_study``, ``_ot_trials``, ``_completed_trials``)
change between the Ray versions this package accepts, and its default sampler (`TPESampler` with
``n_startup_trials=10``) makes every proposal of a small budget an independent random draw. Here the sampler is
configured for small budgets: a few random start-up trials (`startup_trials`), multivariate TPE (block choices
are modelled jointly) and a constant liar (trials in flight count as bad, so concurrent proposals spread out).
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from ray.tune.experiment import Trial
from ray.tune.search import Searcher

from ..blocks import parse_blocks, top_k_blocks
from .base import ENDED_STATUSES, LIVE_STATUSES, LayerSearcher, tune_trials
from .encoding import LAYERS_KEY, encode_layers, is_number, layer_keys

logger = logging.getLogger(__name__)

#: Start-up trials without a trial budget (Optuna's default is 10: random search for any small budget).
DEFAULT_STARTUP_TRIALS = 4
#: TPE draws that may repeat an already proposed subset before an unseen one is taken at random.
MAX_REDRAWS = 20
_ENUMERATE_UP_TO = 4096


def startup_trials(max_trials: int | None) -> int:
    """How many completed trials TPE waits for before it models the results: ``min(4, max(2, T // 3))`` for a
    budget of T trials (2 up to T = 8, 3 for T = 9..11, 4 from T = 12), 4 without a budget. Two is the fewest
    that TPE can split into a better and a worse group; a third of the budget at most keeps most proposals
    modelled."""
    if max_trials is None:
        return DEFAULT_STARTUP_TRIALS
    return min(DEFAULT_STARTUP_TRIALS, max(2, max_trials // 3))


class ExactKSpace:
    """Exactly `k` of `num_blocks` blocks: TPE tunes a score in [0, 1] per block and the `k` highest are kept."""

    def __init__(self, num_blocks: int, k: int) -> None:
        self.num_blocks, self.k = num_blocks, k

    def distributions(self) -> dict[str, BaseDistribution]:
        return {f"score_{key}": FloatDistribution(0.0, 1.0) for key in layer_keys(self.num_blocks)}

    def subset(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        scores = [params[f"score_{key}"] for key in layer_keys(self.num_blocks)]
        return top_k_blocks(scores, self.k)

    def params(self, subset: Sequence[int]) -> dict[str, float]:
        """A point of this space whose top-k is `subset` (chosen blocks 0.75, the others 0.25)."""
        if len(set(subset)) != self.k:
            raise ValueError(f"a point of the exact-{self.k} space needs {self.k} blocks, got {list(subset)}")
        return {f"score_{key}": 0.75 if i in subset else 0.25 for i, key in enumerate(layer_keys(self.num_blocks))}

    def size(self) -> int:
        return math.comb(self.num_blocks, self.k)


class BinarySpace:
    """Any subset: one 0/1 choice per block, named the way Ray's OptunaSearch flattened them (``layers/l00``)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks, self.k = num_blocks, None

    def distributions(self) -> dict[str, BaseDistribution]:
        return {f"{LAYERS_KEY}/{key}": CategoricalDistribution([0, 1]) for key in layer_keys(self.num_blocks)}

    def subset(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(i for i, key in enumerate(layer_keys(self.num_blocks)) if params[f"{LAYERS_KEY}/{key}"])

    def params(self, subset: Sequence[int]) -> dict[str, int]:
        return {f"{LAYERS_KEY}/{key}": int(value) for key, value in encode_layers(subset, self.num_blocks).items()}

    def size(self) -> int:
        return 2**self.num_blocks - 1


def binary_space(num_blocks: int) -> dict[str, BaseDistribution]:
    """One 0/1 choice per block, flattened (``layers/l00``): the any-subset space's Optuna distributions."""
    return BinarySpace(num_blocks).distributions()


def unseen_subset(rng: random.Random, num_blocks: int, k: int | None, seen: set[tuple[int, ...]]
                  ) -> tuple[int, ...] | None:
    """A uniformly drawn subset (exactly `k` blocks, or any non-empty one) not in `seen`; None when none is left."""
    size = math.comb(num_blocks, k) if k else 2**num_blocks - 1
    if len(seen) >= size:
        return None
    if size <= _ENUMERATE_UP_TO:
        sizes = [k] if k else range(1, num_blocks + 1)
        left = [s for n in sizes for s in combinations(range(num_blocks), n) if s not in seen]
        return rng.choice(left)
    while True:  # a large space with few seen: a draw is almost always new
        if k:
            subset = tuple(sorted(rng.sample(range(num_blocks), k)))
        else:
            subset = tuple(i for i in range(num_blocks) if rng.random() < 0.5)
        if subset and subset not in seen:
            return subset


def _point_subset(point: Mapping[str, Any], num_blocks: int) -> tuple[int, ...]:
    """The subset a `points_to_evaluate` entry names: flattened ``{"layers/l00": 1, ...}``, nested
    ``{"layers": {...}}`` or ``{"blocks": [...]}``."""
    if isinstance(point.get(LAYERS_KEY), Mapping):
        flat = {f"{LAYERS_KEY}/{key}": value for key, value in point[LAYERS_KEY].items()}
    else:
        flat = dict(point)
    if "blocks" in flat:
        return parse_blocks(flat["blocks"]) or ()
    return tuple(i for i, key in enumerate(layer_keys(num_blocks)) if flat.get(f"{LAYERS_KEY}/{key}"))


class LayerOptunaSearch(LayerSearcher):
    """TPE over block subsets through an Optuna study this searcher owns (ask/tell). Build it with `tpe_searcher`.

    The space is exactly `k` blocks (a score per block, the top `k` kept) or, without `k`, any non-empty subset
    (a 0/1 choice per block). A proposal repeats an earlier one only once every subset has been proposed: TPE is
    asked again (up to `MAX_REDRAWS` times), then an unseen subset is drawn at random; the discarded draws are
    told FAIL, so TPE learns nothing from them. After `max_trials` proposals it returns `FINISHED`.

    The first `n_startup_trials` proposals are random start-up draws and may run at once; the next one waits
    (`suggest` returns None) until that many have a result, so that it is TPE's, unless none is running any more
    (failed start-up trials never block the sweep). Later proposals run concurrently, spread by the constant liar.

    What Optuna is told: a fine-tune's metric (COMPLETE); a trial stopped early by a scheduler (``final`` False)
    as PRUNED; an errored one, a NaN or missing metric, or a trial that a `Tuner.restore` ended without a
    completion as FAIL (never left RUNNING); a re-run under a new or repeated id (``restart_errored`` /
    ``resume_errored``) as a new evaluated point of its subset. Metric and mode come from the constructor or the
    TuneConfig (as for every `LayerSearcher`); the study is made at the first proposal, once both are known.
    """

    strategy = "tpe"

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        num_blocks: int | None = None,
        k: int | None = None,
        seed: int | None = None,
        trial_seed: int = 0,
        max_trials: int | None = None,
        n_startup_trials: int | None = None,
        study_name: str | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        points_to_evaluate: Sequence[Mapping[str, Any]] | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(metric, mode, num_blocks=num_blocks, base_config=base_config)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive int or None, got {k!r}")
        for name, value, least in (("max_trials", max_trials, 1), ("n_startup_trials", n_startup_trials, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an int >= {least} or None, got {value!r}")
        self._k, self._seed, self._trial_seed, self._max_trials = k, seed, int(trial_seed), max_trials
        self._n_startup = startup_trials(max_trials) if n_startup_trials is None else n_startup_trials
        self._study_name = study_name or f"flexora-tpe-{uuid.uuid4().hex}"
        self._user_sampler = sampler
        self._points = [dict(p) for p in points_to_evaluate or []]
        self._rng = random.Random(seed)
        self._ot_study: optuna.Study | None = None
        self._space: ExactKSpace | BinarySpace | None = None
        self._numbers: dict[str, int] = {}
        self._subsets: dict[str, tuple[int, ...]] = {}
        self._told: set[str] = set()
        self._reruns_told: set[str] = set()

    @property
    def label(self) -> str:
        return f"tpe{self._k}" if self._k else self.strategy

    @property
    def planned_trials(self) -> int | None:
        """`max_trials` (None: until Tune's ``num_samples``)."""
        return self._max_trials

    @property
    def n_startup_trials(self) -> int:
        """Completed trials before TPE models the results; proposals before that are random draws."""
        return self._n_startup

    @property
    def sampler_options(self) -> dict[str, Any]:
        """The `TPESampler` settings: few start-up trials, multivariate, a constant liar unless trials run one at
        a time (``max_concurrent_trials=1``), seeded."""
        return {"n_startup_trials": self._n_startup, "multivariate": True,
                "constant_liar": self._max_concurrent != 1, "seed": self._seed}

    @property
    def sampler(self) -> optuna.samplers.BaseSampler | None:
        """The study's sampler (None until the study is made at the first proposal)."""
        return self._ot_study.sampler if self._ot_study is not None else None

    @property
    def study(self) -> optuna.Study | None:
        """The Optuna study (None until the first proposal)."""
        return self._ot_study

    def _ensure_study(self) -> None:
        if self._ot_study is not None:
            return
        if not self._metric or not self._mode:
            raise RuntimeError(
                f"tpe_searcher needs a metric and a mode (has metric={self._metric!r}, mode={self._mode!r}): pass "
                "them to tpe_searcher(metric=..., mode=...) or to tune.TuneConfig(metric=..., mode=...) (the "
                "TuneConfig's reach the searcher only when param_space is non-empty)"
            )
        total = self.num_blocks
        if self._k is not None and self._k > total:
            raise ValueError(f"k={self._k} exceeds the model's {total} blocks")
        self._space = ExactKSpace(total, self._k) if self._k else BinarySpace(total)
        sampler = self._user_sampler or optuna.samplers.TPESampler(**self.sampler_options)
        study = optuna.create_study(study_name=self._study_name, sampler=sampler,
                                    direction="maximize" if self._mode == "max" else "minimize")
        for point in self._points:
            study.enqueue_trial(self._space.params(_point_subset(point, total)))
        self._ot_study = study

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._ensure_study()
        trials = tune_trials()
        if trials is not None:
            self._settle_ended(trials)
        if self._max_trials is not None and len(self._numbers) >= self._max_trials:
            return Searcher.FINISHED
        if self.at_capacity(trials) or self._awaiting_startup(trials):
            return None
        number, subset = self._propose()
        self._numbers[trial_id], self._subsets[trial_id] = number, subset
        config = {"stage": "finetune", "strategy": self.label, "seed": self._trial_seed,
                  LAYERS_KEY: encode_layers(subset, self.num_blocks)}
        return self._suggestion(trial_id, config)

    def _awaiting_startup(self, trials: list[Trial] | None) -> bool:
        """Whether to hold the next proposal: the start-up trials are all proposed, too few have results for TPE to
        model, and some are still running. Without this, free slots (a comparison runs every arm at once) would
        turn every proposal of a small budget into a start-up draw, i.e. random search."""
        if self._user_sampler is not None or len(self._numbers) < self._n_startup:
            return False
        modelled = self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if len(modelled) >= self._n_startup:
            return False
        if trials is None:
            return any(t in self._open for t in self._numbers)
        return any(t.status in LIVE_STATUSES and t.trial_id in self._numbers for t in trials)

    def _propose(self) -> tuple[int, tuple[int, ...]]:
        """Ask the study for a subset not proposed before (see the class docstring); (trial number, subset)."""
        assert self._ot_study is not None and self._space is not None
        study, space = self._ot_study, self._space
        seen = set(self._subsets.values())
        exhausted = len(seen) >= space.size()
        for _ in range(MAX_REDRAWS):
            trial = study.ask(space.distributions())
            subset = space.subset(trial.params)
            if subset and (exhausted or subset not in seen):
                return trial.number, subset
            study.tell(trial, None, state=TrialState.FAIL)
        fresh = unseen_subset(self._rng, space.num_blocks, space.k, seen)
        if fresh is None:  # unreachable while TPE can draw a non-empty subset; a repeat beats failing the sweep
            fresh = next(iter(seen))
        study.enqueue_trial(space.params(fresh))
        return study.ask(space.distributions()).number, fresh

    def _settle_ended(self, trials: list[Trial]) -> None:
        """Tell FAIL for trials Tune ended without a completion (a restore with ``resume_unfinished=False``), so
        none stays RUNNING in the study (a running trial is a constant-liar lie for ever)."""
        for trial in trials:
            if trial.status in ENDED_STATUSES and trial.trial_id in self._numbers and trial.trial_id not in self._told:
                self.on_trial_complete(trial.trial_id, result=None, error=True)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        repeated = trial_id in self._told
        super().on_trial_complete(trial_id, result, error)
        if trial_id not in self._numbers or repeated:
            self._tell_rerun(trial_id, result, error)
            return
        value = (result or {}).get(self._metric)
        if error or not is_number(value):
            state, value = TrialState.FAIL, None
        elif result.get("final") is False:
            state, value = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        try:
            self._ot_study.tell(self._numbers[trial_id], value, state=state)
        except Exception as exc:  # Optuna refuses e.g. a second tell; the sweep must go on
            logger.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        self._told.add(trial_id)

    def _tell_rerun(self, trial_id: str, result: Mapping[str, Any] | None, error: bool) -> None:
        """A finished run of a subset this study did not ask for under that id (a trial re-run by a restore): add
        it as an evaluated point of its subset, once per trial id."""
        if error or not result or result.get("strategy") != self.label or result.get("final") is not True:
            return
        value, blocks = result.get(self._metric), parse_blocks(result.get("blocks"))
        if (self._ot_study is None or self._space is None or not is_number(value) or not blocks
                or result.get("num_blocks_total") != self._space.num_blocks or trial_id in self._reruns_told
                or (self._k and len(blocks) != self._k)):
            return
        self._ot_study.add_trial(create_trial(state=TrialState.COMPLETE, value=float(value),
                                              params=self._space.params(blocks),
                                              distributions=self._space.distributions()))
        self._reruns_told.add(trial_id)


def tpe_searcher(
    metric: str | None = None,
    mode: str | None = None,
    *,
    num_blocks: int | None = None,
    k: int | None = None,
    seed: int | None = None,
    trial_seed: int = 0,
    max_trials: int | None = None,
    n_startup_trials: int | None = None,
    study_name: str | None = None,
    sampler: Any = None,
    points_to_evaluate: list[dict] | None = None,
    base_config: Mapping[str, Any] | None = None,
) -> LayerOptunaSearch:
    """TPE over block subsets (Optuna's `TPESampler` configured for small budgets, seeded by `seed`).

    Exactly `k` blocks (a score per block, the top `k` kept), like ``RandomLayerSearcher(k=...)``; without `k`,
    any non-empty subset (one 0/1 choice per block). `num_blocks` (L) defaults to the block count of the
    config's model. `max_trials` proposals at most, each a subset not proposed before (while any is left); the
    first `n_startup_trials` completed trials (default `startup_trials(max_trials)`) are random draws, every
    later proposal is TPE's. `sampler` replaces the TPE sampler (e.g. ``optuna.samplers.RandomSampler``).
    `points_to_evaluate` are proposed first (``{"layers/l00": 1, ...}``, ``{"layers": {...}}`` or
    ``{"blocks": [...]}``). Fine-tunes use seed `trial_seed`. `metric`/`mode` may be left to the TuneConfig;
    if both give one, they must agree.
    """
    return LayerOptunaSearch(
        metric, mode, num_blocks=num_blocks, k=k, seed=seed, trial_seed=trial_seed, max_trials=max_trials,
        n_startup_trials=n_startup_trials, study_name=study_name, sampler=sampler,
        points_to_evaluate=points_to_evaluate, base_config=base_config,
    )
