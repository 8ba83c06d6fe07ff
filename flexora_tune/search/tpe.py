"""TPE over block subsets: a thin subclass of Ray's own `OptunaSearch`, one binary choice per block.

It handles OptunaSearch's quirks: metric/mode taken the Tune way (never Ray's placeholder metric), NaN or
missing metrics (told as FAIL instead of leaving the Optuna trial running forever or raising), early-stopped
trials (told as PRUNED, not as complete with a partial value), a unique study name per searcher, empty subsets
(rejected before they reach a trial), the block count read lazily from the config's model, an exact-k budget
through a define-by-run space, and trials that a `Tuner.restore` ends or re-runs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.search.optuna import OptunaSearch

from ..blocks import parse_blocks, top_k_blocks
from .base import ENDED_STATUSES, LIVE_STATUSES, check_mode, check_resolved, resolve_metric_mode, tune_trials
from .encoding import LAYERS_KEY, encode_layers, is_number, layer_keys, num_blocks_of

logger = logging.getLogger(__name__)
_MAX_EMPTY_DRAWS = 1000


class ExactKSpace:
    """Define-by-run space for exactly `k` of `num_blocks` blocks: TPE tunes a score per block and the
    `k` highest scores are kept. A class (not a closure) so the searcher pickles."""

    def __init__(self, num_blocks: int, k: int) -> None:
        self.num_blocks, self.k = num_blocks, k

    def __call__(self, trial: Any) -> dict[str, Any]:
        scores = [trial.suggest_float(f"score_{key}", 0.0, 1.0) for key in layer_keys(self.num_blocks)]
        return {LAYERS_KEY: encode_layers(top_k_blocks(scores, self.k), self.num_blocks)}


def binary_space(num_blocks: int) -> dict[str, CategoricalDistribution]:
    """One 0/1 choice per block, flattened the way OptunaSearch names nested params (``layers/l00``)."""
    return {f"{LAYERS_KEY}/{key}": CategoricalDistribution([0, 1]) for key in layer_keys(num_blocks)}


class LayerOptunaSearch(OptunaSearch):
    """`OptunaSearch` over block subsets in the shared ``layers`` encoding. Build it with `tpe_searcher`.

    Metric and mode come from the constructor or else the TuneConfig (a conflict raises before any trial); the
    Optuna study is made only once both are known, so Ray's placeholder metric never reaches it. It limits
    ``max_concurrent_trials`` itself by the trials Tune still runs, tells Optuna FAIL for a trial a restore ended
    without a completion, and tells a re-run (``restart_errored``/``resume_errored``) as a new evaluated point.
    """

    strategy = "tpe"

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        num_blocks: int | None = None,
        k: int | None = None,
        trial_seed: int = 0,
        base_config: Mapping[str, Any] | None = None,
        **optuna_kwargs: Any,
    ) -> None:
        check_mode(mode)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive int or None, got {k!r}")
        optuna_kwargs["study_name"] = optuna_kwargs.get("study_name") or f"flexora-tpe-{uuid.uuid4().hex}"
        super().__init__(space=None, metric=metric, mode=mode, **optuna_kwargs)
        self._num_blocks, self._k, self._trial_seed = num_blocks, k, int(trial_seed)
        self._base_config = dict(base_config or {})
        self._tune_config: dict[str, Any] = {}
        self._max_concurrent: int | None = None
        self._reruns_told: set[str] = set()
        if num_blocks is not None and metric and mode:
            self._build(num_blocks)

    def _build(self, num_blocks: int) -> None:
        if not self._metric or self._metric == DEFAULT_METRIC or not self._mode:
            raise RuntimeError(f"tpe_searcher has no metric/mode yet (metric={self._metric!r}, mode={self._mode!r})")
        if self._k is not None and self._k > num_blocks:
            raise ValueError(f"k={self._k} exceeds the model's {num_blocks} blocks")
        self._num_blocks = num_blocks
        self._space = ExactKSpace(num_blocks, self._k) if self._k else binary_space(num_blocks)
        self._setup_study(self._mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        check_resolved(config, "tpe_searcher")
        self._metric, self._mode = resolve_metric_mode("tpe_searcher", self._metric, self._mode, metric, mode)
        self._tune_config = dict(config)
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Take Tune's ``max_concurrent_trials`` here (see `LayerSearcher.set_max_concurrency`)."""
        self._max_concurrent = int(max_concurrent) if max_concurrent else None
        return True

    def _ensure_study(self) -> None:
        if self._ot_study is not None:
            return
        if not self._metric or not self._mode:
            raise RuntimeError(
                f"tpe_searcher needs a metric and a mode (has metric={self._metric!r}, mode={self._mode!r}): pass "
                "them to tpe_searcher(metric=..., mode=...) or to tune.TuneConfig(metric=..., mode=...) (the "
                "TuneConfig's reach the searcher only when param_space is non-empty)"
            )
        model = {**self._base_config, **self._tune_config}.get("model", "default")
        self._build(self._num_blocks or num_blocks_of(model))

    def _suggest_from_define_by_run_func(self, func, ot_trial) -> dict:
        return dict(func(ot_trial))  # the scores stay in the Optuna trial; the trial config gets only layers

    def suggest(self, trial_id: str) -> dict | None:
        self._ensure_study()
        trials = tune_trials()
        if trials is not None:
            self._settle_ended(trials)
        if self._max_concurrent is not None and self._live_count(trials) >= self._max_concurrent:
            return None
        for _ in range(_MAX_EMPTY_DRAWS):
            params = super().suggest(trial_id)
            layers = params.get(LAYERS_KEY, {})
            if any(layers.values()):
                return {**self._base_config, "stage": "finetune", "strategy": self._label,
                        "seed": self._trial_seed, **params}
            self._ot_study.tell(self._ot_trials.pop(trial_id), None, state=TrialState.FAIL)
        raise RuntimeError(f"TPE proposed only empty subsets in {_MAX_EMPTY_DRAWS} draws")

    def _owns(self, trial: Trial) -> bool:
        return trial.trial_id in self._ot_trials or (trial.config or {}).get("strategy") == self._label

    def _live_count(self, trials: list[Trial] | None) -> int:
        if trials is None:
            return len(set(self._ot_trials) - self._completed_trials)
        return sum(1 for t in trials if t.status in LIVE_STATUSES and self._owns(t))

    def _settle_ended(self, trials: list[Trial]) -> None:
        """Tell Optuna about trials Tune ended without a completion (a restore with ``resume_unfinished=False``),
        so none stays RUNNING in the study."""
        for trial in trials:
            if (trial.status in ENDED_STATUSES and trial.trial_id in self._ot_trials
                    and trial.trial_id not in self._completed_trials):
                self.on_trial_complete(trial.trial_id, result=trial.last_result, error=trial.status == Trial.ERROR)

    @property
    def _label(self) -> str:
        return f"tpe{self._k}" if self._k else self.strategy

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        known = trial_id in self._ot_trials and trial_id not in self._completed_trials
        if known and "training_iteration" in result and is_number(result.get(self._metric)):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            self._tell_rerun(trial_id, result, error)
            return
        ot_trial = self._ot_trials[trial_id]
        value = (result or {}).get(self._metric)
        if error or not is_number(value):
            state, value = TrialState.FAIL, None
        elif result.get("final") is False:
            state, value = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as exc:  # Optuna refuses e.g. a second tell; the sweep must go on
            logger.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _tell_rerun(self, trial_id: str, result: Mapping[str, Any] | None, error: bool) -> None:
        """A finished run of a subset this study did not ask for under that id (a trial re-run by a restore):
        add it as an evaluated point, by its subset. Only the binary space can name its params from a subset."""
        if error or not result or result.get("strategy") != self._label or result.get("final") is not True:
            return
        value, blocks = result.get(self._metric), parse_blocks(result.get("blocks"))
        total = result.get("num_blocks_total")
        if (self._ot_study is None or callable(self._space) or not is_number(value) or not blocks
                or total != self._num_blocks or trial_id in self._reruns_told):
            return
        params = {f"{LAYERS_KEY}/{key}": v for key, v in encode_layers(blocks, total).items()}
        self._ot_study.add_trial(create_trial(state=TrialState.COMPLETE, value=float(value), params=params,
                                              distributions=self._space))
        self._reruns_told.add(trial_id)


def tpe_searcher(
    metric: str | None = None,
    mode: str | None = None,
    *,
    num_blocks: int | None = None,
    k: int | None = None,
    seed: int | None = None,
    trial_seed: int = 0,
    study_name: str | None = None,
    sampler: Any = None,
    points_to_evaluate: list[dict] | None = None,
    base_config: Mapping[str, Any] | None = None,
) -> LayerOptunaSearch:
    """Ray's `OptunaSearch` (TPE by default, seeded by `seed`) over block subsets.

    Any subset (one 0/1 choice per block) or, with `k`, exactly `k` blocks (define-by-run: a score per
    block, the top `k` kept). `num_blocks` (L) defaults to the block count of the config's model.
    `points_to_evaluate` take flattened keys (``{"layers/l00": 1, ...}``; binary space only).
    Fine-tunes use seed `trial_seed`. `metric`/`mode` may be left to the TuneConfig; if both give one, they
    must agree.
    """
    return LayerOptunaSearch(
        metric, mode, num_blocks=num_blocks, k=k, trial_seed=trial_seed, base_config=base_config, seed=seed,
        study_name=study_name, sampler=sampler, points_to_evaluate=points_to_evaluate,
    )
