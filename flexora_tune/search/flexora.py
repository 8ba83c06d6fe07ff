"""Flexora as a Ray Tune searcher: search trials first, then fine-tunes of the subsets they selected."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.search import Searcher

from ..blocks import parse_blocks, top_k_blocks
from ..results import FINETUNE_STEP
from .base import ENDED_STATUSES, LIVE_STATUSES, Identity, LayerSearcher, subset_of, tune_trials
from .encoding import encode_layers, is_number
from .neighbours import plan_subsets

logger = logging.getLogger(__name__)


def consensus(selections: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Blocks chosen by more than half of the searches; if none is, those chosen most often."""
    votes: dict[int, int] = {}
    for selection in selections:
        for block in selection:
            votes[block] = votes.get(block, 0) + 1
    if not votes:
        return ()
    majority = tuple(sorted(b for b, n in votes.items() if n * 2 > len(selections)))
    return majority or tuple(sorted(b for b, n in votes.items() if n == max(votes.values())))


def read_selection(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The selection a search trial's *final* report carries (its checkpoint holds ``selection.json``), or None
    for any other report: a search cut short has no saved selection and contributes nothing."""
    if not result or result.get("final") is not True:
        return None
    blocks = parse_blocks(result.get("blocks"))
    alpha = result.get("alpha")
    numeric = isinstance(alpha, list | tuple) and all(map(is_number, alpha))
    alpha = [float(a) for a in alpha] if numeric else []
    total = result.get("num_blocks_total") or len(alpha) or None
    if not blocks or not total:
        return None
    return {"blocks": blocks, "alpha": alpha, "num_blocks_total": int(total)}


class FlexoraSearcher(LayerSearcher):
    """Run `n_searches` Flexora search trials (seeds `search_seeds`), wait for them, then fine-tune:

    1. each search's selection, in seed order;
    2. their consensus (majority vote), when there are several searches;
    3. with `neighbours` = n > 0, the top-(k±1..n) blocks by mean alpha around the consensus size k;

    each with every seed in `finetune_seeds`, never the same (subset, seed) twice; then `FINISHED`.
    `planned_trials` is the most trials this makes (the defaults give 4: one search, its selection and the
    top-(k-1) and top-(k+1) neighbours); pass it as ``num_samples``. `metric`/`mode` are only recorded (for
    Tune's result checks), since the selection comes from the searches themselves.

    With `finetunes` = T (instead of `neighbours`), exactly T distinct subsets are fine-tuned per fine-tune seed
    (a comparison's equal arms): the consensus first when there are several searches (it pools their evidence,
    so with T = 1 it is the one fine-tuned), then each search's selection, then the nearest neighbours by mean
    alpha (top-(k-1), top-(k+1), top-(k-2), ...; sizes outside 1..L skipped), then the next-best subsets by
    alpha (`neighbours.alpha_neighbours`); fewer only when the model has fewer than T non-empty subsets.
    `planned_trials` is then the searches plus T per fine-tune seed.

    A search contributes only its final report, whose checkpoint holds ``selection.json``: one that errors, is
    cut short by a scheduler (give schedulers ``time_attr=FINETUNE_STEP`` and they never are) or is ended by a
    restore contributes nothing. State is kept by search seed and (subset, seed), not by trial id, and the wait
    for searches follows the trials Tune still runs, so every `Tuner.restore` option continues the sweep: a
    search re-run by ``restart_errored``/``resume_errored`` counts (a selection that arrives after the plan was
    made is fine-tuned too, with the consensus if it was missing), and one ended by ``resume_unfinished=False``
    is recognised as finished without a selection. A sweep that already returned `FINISHED` is not extended by
    a restore (Tune asks a finished searcher nothing more).
    """

    strategy = "flexora"

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        n_searches: int = 1,
        search_seeds: Sequence[int] | None = None,
        finetune_seeds: Sequence[int] = (0,),
        neighbours: int = 1,
        finetunes: int | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(metric, mode, base_config=base_config)
        seeds = list(search_seeds) if search_seeds is not None else list(range(n_searches))
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"need at least one search, with distinct seeds; got {seeds}")
        if not finetune_seeds or len(set(finetune_seeds)) != len(finetune_seeds):
            raise ValueError(f"finetune_seeds must be distinct and non-empty, got {list(finetune_seeds)}")
        if neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {neighbours}")
        if finetunes is not None and (isinstance(finetunes, bool) or not isinstance(finetunes, int) or finetunes < 1):
            raise ValueError(f"finetunes must be a positive int (fine-tunes per seed) or None, got {finetunes!r}")
        self._search_seeds = [int(s) for s in seeds]
        self._finetune_seeds = [int(s) for s in finetune_seeds]
        self._neighbours = int(neighbours)
        self._finetunes = finetunes
        self._planned_from: tuple[int, ...] | None = None
        self._searches_suggested: set[int] = set()
        self._selections: dict[int, dict[str, Any] | None] = {}
        self._final_reports: dict[str, dict[str, Any]] = {}
        self._plan: list[tuple[str, tuple[int, ...]]] | None = None
        self._finetunes_suggested: set[tuple[tuple[int, ...], int]] = set()

    @property
    def planned_trials(self) -> int:
        n = len(self._search_seeds)
        if self._finetunes is not None:
            return n + self._finetunes * len(self._finetune_seeds)
        subsets = n + (1 if n > 1 else 0) + 2 * self._neighbours
        return n + subsets * len(self._finetune_seeds)

    @property
    def selections(self) -> dict[int, tuple[int, ...]]:
        """Search seed -> the blocks that search selected (finished searches only)."""
        return {seed: tuple(r["blocks"]) for seed, r in self._selections.items() if r}

    def identity(self, source: Mapping[str, Any]) -> Identity | None:
        """``("search", seed)`` or ``("finetune", blocks, seed)`` for a trial of this searcher, else None."""
        if source.get("strategy") != self.strategy:
            return None
        stage, seed = source.get("stage"), source.get("seed")
        if stage == "search":
            return ("search", seed) if seed in self._search_seeds else None
        if stage == "finetune":
            return ("finetune", subset_of(source), seed)
        return None

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        trials = tune_trials()
        waiting = self._searches_in_progress(trials)
        if self.at_capacity(trials):
            return None
        for seed in self._search_seeds:
            if seed not in self._searches_suggested:
                self._searches_suggested.add(seed)
                config = {"stage": "search", "strategy": self.strategy, "seed": seed, "variant": f"search{seed}"}
                return self._suggestion(trial_id, config)
        if self._plan is None and waiting:
            return None
        total = self._update_plan()
        for variant, blocks in self._plan or []:
            for seed in self._finetune_seeds:
                if (blocks, seed) not in self._finetunes_suggested:
                    self._finetunes_suggested.add((blocks, seed))
                    return self._suggestion(trial_id, {
                        "stage": "finetune", "strategy": self.strategy, "variant": variant, "seed": seed,
                        "layers": encode_layers(blocks, total)})
        return None if waiting else Searcher.FINISHED

    def _searches_in_progress(self, trials: list[Trial] | None) -> set[int]:
        """Search seeds whose result may still come. With Tune's view: seeds with a trial Tune still runs (a
        re-run search re-opens its seed), and a search trial Tune ended without telling this searcher (a restore
        with ``resume_unfinished=False``) is settled from its last report. Without it: seeds suggested or
        reporting and not yet completed."""
        if trials is None:
            return {self._owned[i][1] for i in self._open if self._owned[i][0] == "search"}
        live: set[int] = set()
        ended: dict[int, Trial] = {}
        for trial in trials:
            identity = self.identity(trial.config or {})
            if identity is None or identity[0] != "search":
                continue
            if trial.status in LIVE_STATUSES:
                live.add(identity[1])
            elif trial.status in ENDED_STATUSES:
                ended.setdefault(identity[1], trial)
        for seed in live:
            self._reopen(seed)
        for seed, trial in ended.items():
            if seed not in live and seed not in self._selections:
                self._settle(seed, trial.trial_id, trial.last_result, error=trial.status == Trial.ERROR,
                             told=False)
        return {seed for seed in live if not self._selections.get(seed)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        identity = self._owned.get(trial_id)
        if identity is None or identity[0] != "search":
            return
        self._reopen(identity[1])
        if result.get("final") is True:
            self._final_reports[trial_id] = {k: result.get(k) for k in ("blocks", "alpha", "num_blocks_total",
                                                                         "final")}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        repeated = trial_id in self._owned and trial_id not in self._open  # completed, and not run again since
        super().on_trial_complete(trial_id, result, error)
        identity = self._owned.get(trial_id)
        if identity is not None and identity[0] == "search" and not repeated:
            self._settle(identity[1], trial_id, result, error)

    def _reopen(self, seed: int) -> None:
        """A search that ended without a selection runs again (re-run by a restore): wait for it once more."""
        if seed in self._selections and self._selections[seed] is None:
            del self._selections[seed]

    def _settle(self, seed: int, trial_id: str, result: Mapping[str, Any] | None, error: bool,
                told: bool = True) -> None:
        """Record how search `seed` ended: its saved selection, or None (contributes nothing). `told` is False
        for a trial Tune ended without a completion (a restore with ``resume_unfinished=False``)."""
        final = self._final_reports.pop(trial_id, None)
        selection = read_selection(result if not error else None) or read_selection(final)
        if self._selections.get(seed):
            return
        if selection is not None:
            self._selections[seed] = selection
            return
        self._selections[seed] = None
        if not told:
            logger.warning("Flexora search seed %s (trial %s) was ended by Tune before it finished (e.g. "
                           "Tuner.restore(resume_unfinished=False)); it contributes no selection.", seed, trial_id)
        elif not error:
            logger.warning(
                "Flexora search seed %s (trial %s) was stopped at step %s before it finished, so it contributes no "
                "selection. A scheduler stops searches only when it compares them: give it time_attr=%r, which "
                "search reports hold at 0.", seed, trial_id, (result or {}).get("step", "?"), FINETUNE_STEP)

    def _update_plan(self) -> int:
        """Make the fine-tune plan once every search has ended; add a selection that arrives later (a search
        re-run by a restore), and the consensus once there are two. Returns the model's block count."""
        found = [(s, r) for s in self._search_seeds if (r := self._selections.get(s))]
        if not found:
            self._plan = self._plan or []
            return 0
        total = found[0][1]["num_blocks_total"]
        if self._finetunes is not None:
            seeds = tuple(s for s, _ in found)
            if self._plan is None or seeds != self._planned_from:
                self._plan, self._planned_from = self._budget_plan(found, total), seeds
            return total
        if self._plan is None:
            self._plan = self._first_plan([r for _, r in found], [s for s, _ in found], total)
            return total
        variants = {variant for variant, _ in self._plan}
        for seed, r in found:
            if f"search{seed}" not in variants:
                self._plan.append((f"search{seed}", tuple(r["blocks"])))
        if len(found) > 1 and "consensus" not in variants:
            self._plan.append(("consensus", consensus([r["blocks"] for _, r in found])))
        return total

    def _budget_plan(self, found: list[tuple[int, dict[str, Any]]], total: int) -> list[tuple[str, tuple[int, ...]]]:
        """The T-fine-tune plan for the selections found so far. Entries already fine-tuned (for any seed) stay;
        a selection that arrives later (a search re-run by a restore) takes the place of a neighbour not yet
        fine-tuned, so the plan never exceeds T unless T were already run."""
        base = [(f"search{s}", tuple(r["blocks"])) for s, r in found]
        agreed = consensus([b for _, b in base])
        if len(base) > 1:
            base.insert(0, ("consensus", agreed))
        alphas = [r["alpha"] for _, r in found if len(r["alpha"]) == total]
        mean = [sum(a[i] for a in alphas) / len(alphas) for i in range(total)] if alphas else None
        started = [(v, b) for v, b in self._plan or []
                   if any((b, seed) in self._finetunes_suggested for seed in self._finetune_seeds)]
        count = max(self._finetunes or 0, len(started))
        return plan_subsets([*started, *base], agreed, mean, total, count)

    def _first_plan(self, found: list[dict[str, Any]], seeds: list[int], total: int
                    ) -> list[tuple[str, tuple[int, ...]]]:
        subsets = [(f"search{s}", tuple(r["blocks"])) for s, r in zip(seeds, found, strict=True)]
        agreed = consensus([r["blocks"] for r in found])
        if len(found) > 1:
            subsets.append(("consensus", agreed))
        alphas = [r["alpha"] for r in found if len(r["alpha"]) == total]
        if alphas and self._neighbours:
            mean = [sum(a[i] for a in alphas) / len(alphas) for i in range(total)]
            for d in range(1, self._neighbours + 1):
                for k in (len(agreed) - d, len(agreed) + d):
                    if 1 <= k <= total:
                        subsets.append((f"top{k}", top_k_blocks(mean, k)))
        return subsets
