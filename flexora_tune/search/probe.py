"""A cheap importance probe as a Ray Tune searcher: one probe trial (lora-norm or grad-norm, `probes.py`), then
fine-tunes of its top-k blocks (and, for a comparison's equal arms, the subsets nearest them by the probe's scores)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.search import Searcher

from ..blocks import parse_blocks, top_k_blocks
from ..probes import PROBES
from ..results import PROBE_KEY, PROBE_SCORES, PROBE_STAGE
from .base import ENDED_STATUSES, LIVE_STATUSES, Identity, LayerSearcher, subset_of, tune_trials
from .encoding import encode_layers, is_number
from .neighbours import plan_subsets

logger = logging.getLogger(__name__)

def read_probe(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The scores and kept blocks a probe trial's *final* report carries (its checkpoint holds ``probe.json``),
    or None for any other report."""
    if not result or result.get("final") is not True:
        return None
    scores = result.get(PROBE_SCORES)
    blocks = parse_blocks(result.get("blocks"))
    if not blocks or not isinstance(scores, list | tuple) or not scores or not all(map(is_number, scores)):
        return None
    return {"blocks": blocks, "scores": [float(s) for s in scores], "num_blocks_total": len(scores)}


class ProbeSearcher(LayerSearcher):
    """Run one probe trial (``stage="probe"``, seed `seed`), wait for its final report (its ranking), then
    fine-tune `finetunes` distinct subsets with every seed in `finetune_seeds` (default: `seed`), then `FINISHED`:

    1. the probe's top-`k` blocks by score (variant ``probe<seed>``);
    2. with `finetunes` = T > 1, the nearest subsets by the probe's scores, as Flexora's equal arm takes them by
       alpha (`neighbours.plan_subsets`: top-(k-1), top-(k+1), top-(k-2), ..., then the next-best subsets).

    k is `k` when given (a comparison passes the size Flexora selected for that seed, as for ``random``); else the
    probe's own default, the blocks scoring above the mean score (Flexora's ``mean`` rule on the scores). The
    probe trial gets ``top_k=k``, so the blocks it reports are the ones fine-tuned. `planned_trials` = 1 + T per
    fine-tune seed; pass it as ``num_samples``. `metric`/`mode` are only recorded (for Tune's result checks).

    Trials carry ``strategy`` = the probe's name. State is kept by what a trial is (the probe's seed; (subset,
    seed) for fine-tunes), and the wait for the probe follows the trials Tune still runs, as in
    `FlexoraSearcher`: a probe re-run by a `Tuner.restore` (``restart_errored``/``resume_errored``) is waited for,
    one ended by ``resume_unfinished=False`` is settled from its last report, and a probe that fails contributes
    nothing (the searcher then finishes without fine-tunes).
    """

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        probe: str = "lora-norm",
        k: int | None = None,
        seed: int = 0,
        finetune_seeds: Sequence[int] | None = None,
        finetunes: int = 1,
        num_blocks: int | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(metric, mode, num_blocks=num_blocks, base_config=base_config)
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive int or None (the probe's default), got {k!r}")
        if isinstance(finetunes, bool) or not isinstance(finetunes, int) or finetunes < 1:
            raise ValueError(f"finetunes must be a positive int (fine-tunes per seed), got {finetunes!r}")
        seeds = [int(seed)] if finetune_seeds is None else [int(s) for s in finetune_seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"finetune_seeds must be distinct and non-empty, got {seeds}")
        self._probe, self._k, self._seed = probe, k, int(seed)
        self._finetune_seeds, self._finetunes = seeds, finetunes
        self._probe_suggested = False
        self._outcome: dict[str, Any] | None = None
        self._settled = False
        self._plan: list[tuple[str, tuple[int, ...]]] | None = None
        self._finetunes_suggested: set[tuple[tuple[int, ...], int]] = set()

    @property
    def label(self) -> str:
        return self._probe

    @property
    def planned_trials(self) -> int:
        return 1 + self._finetunes * len(self._finetune_seeds)

    @property
    def outcome(self) -> dict[str, Any] | None:
        """The finished probe's ``{"blocks", "scores", "num_blocks_total"}``, or None."""
        return self._outcome

    def identity(self, source: Mapping[str, Any]) -> Identity | None:
        """``("probe", seed)`` or ``("finetune", blocks, seed)`` for a trial of this searcher, else None."""
        if source.get("strategy") != self.label:
            return None
        stage, seed = source.get("stage"), source.get("seed")
        if stage == PROBE_STAGE:
            return ("probe", seed) if seed == self._seed else None
        if stage == "finetune":
            return ("finetune", subset_of(source), seed)
        return None

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        trials = tune_trials()
        waiting = self._probe_in_progress(trials)
        if self.at_capacity(trials):
            return None
        if not self._probe_suggested:
            self._probe_suggested = True
            config: dict[str, Any] = {"stage": PROBE_STAGE, "strategy": self.label, PROBE_KEY: self._probe,
                                      "seed": self._seed, "variant": f"probe{self._seed}"}
            if self._k is not None:
                config["top_k"] = self._k
            return self._suggestion(trial_id, config)
        if self._outcome is None:
            return None if waiting else Searcher.FINISHED
        total = self._outcome["num_blocks_total"]
        for variant, blocks in self._make_plan():
            for seed in self._finetune_seeds:
                if (blocks, seed) not in self._finetunes_suggested:
                    self._finetunes_suggested.add((blocks, seed))
                    return self._suggestion(trial_id, {
                        "stage": "finetune", "strategy": self.label, "variant": variant, "seed": seed,
                        "layers": encode_layers(blocks, total)})
        return Searcher.FINISHED

    def _make_plan(self) -> list[tuple[str, tuple[int, ...]]]:
        if self._plan is None:
            scores, total = self._outcome["scores"], self._outcome["num_blocks_total"]
            if self._k is not None and self._k > total:
                raise ValueError(f"k={self._k} exceeds the model's {total} blocks")
            top = top_k_blocks(scores, self._k) if self._k is not None else tuple(self._outcome["blocks"])
            self._plan = plan_subsets([(f"probe{self._seed}", top)], top, scores, total, self._finetunes)
        return self._plan

    def _probe_in_progress(self, trials: list[Trial] | None) -> bool:
        """Whether the probe's result may still come. With Tune's view: a probe trial Tune still runs (a re-run
        re-opens a probe that failed), and one Tune ended without telling this searcher is settled from its last
        report. Without it: the probe was suggested or reported and has not completed."""
        if self._outcome is not None:
            return False
        if trials is None:
            return any(self._owned[i][0] == "probe" for i in self._open)
        live, ended = False, None
        for trial in trials:
            if self.identity(trial.config or {}) != ("probe", self._seed):
                continue
            if trial.status in LIVE_STATUSES:
                live = True
            elif trial.status in ENDED_STATUSES and ended is None:
                ended = trial
        if live:
            self._settled = False
        elif ended is not None and not self._settled:
            self._settle(ended.trial_id, ended.last_result, error=ended.status == Trial.ERROR, told=False)
        return live and self._outcome is None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        identity = self._owned.get(trial_id)
        if identity is None or identity[0] != "probe":
            return
        self._settled = False
        if self._outcome is None:
            self._outcome = read_probe(result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        repeated = trial_id in self._owned and trial_id not in self._open
        super().on_trial_complete(trial_id, result, error)
        identity = self._owned.get(trial_id)
        if identity is not None and identity[0] == "probe" and not repeated:
            self._settle(trial_id, result, error)

    def _settle(self, trial_id: str, result: Mapping[str, Any] | None, error: bool, told: bool = True) -> None:
        """Record how the probe ended: its scores, or nothing (the searcher then has nothing to fine-tune)."""
        self._settled = True
        if self._outcome is None:
            self._outcome = read_probe(result if not error else None)
        if self._outcome is None:
            how = "was ended by Tune before it finished" if not told else ("failed" if error else "was stopped early")
            logger.warning("%s probe seed %s (trial %s) %s; it contributes no ranking.", self._probe, self._seed,
                           trial_id, how)
