"""Flexora as a Ray Tune searcher: search trials first, then fine-tunes of the subsets they selected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search import Searcher

from ..blocks import parse_blocks, top_k_blocks
from .base import LayerSearcher
from .encoding import encode_layers, is_number


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


class FlexoraSearcher(LayerSearcher):
    """Run `n_searches` Flexora search trials (seeds `search_seeds`), wait for them, then fine-tune:

    1. each search's selection, in seed order;
    2. their consensus (majority vote), when there are several searches;
    3. with `neighbours` = n > 0, the top-(k±1..n) blocks by mean alpha around the consensus size k;

    each with every seed in `finetune_seeds`, never the same (subset, seed) twice; then `FINISHED`.
    `planned_trials` is the most trials this makes (the defaults give 4: one search, its selection and the
    top-(k-1) and top-(k+1) neighbours); pass it as ``num_samples``. A search that errors contributes
    nothing; one stopped early contributes the selection it last reported. `metric`/`mode` are only
    recorded (for Tune's result checks), since the selection comes from the searches themselves.
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
        self._search_seeds = [int(s) for s in seeds]
        self._finetune_seeds = [int(s) for s in finetune_seeds]
        self._neighbours = int(neighbours)
        self._searches_suggested: list[int] = []
        self._search_results: dict[int, dict[str, Any] | None] = {}
        self._latest: dict[str, dict[str, Any]] = {}
        self._plan: list[dict[str, Any]] | None = None
        self._finetunes_suggested: set[tuple[tuple[int, ...], int]] = set()

    @property
    def planned_trials(self) -> int:
        n = len(self._search_seeds)
        subsets = n + (1 if n > 1 else 0) + 2 * self._neighbours
        return n + subsets * len(self._finetune_seeds)

    @property
    def selections(self) -> dict[int, tuple[int, ...]]:
        """Search seed -> the blocks that search selected (completed searches only)."""
        return {seed: tuple(r["blocks"]) for seed, r in self._search_results.items() if r}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for seed in self._search_seeds:
            if seed not in self._searches_suggested:
                self._searches_suggested.append(seed)
                config = {"stage": "search", "strategy": self.strategy, "seed": seed,
                          "variant": f"search{seed}"}
                return self._suggestion(trial_id, ("search", seed), config)
        if len(self._search_results) < len(self._search_seeds):
            return None
        if self._plan is None:
            self._plan = self._finetune_plan()
        while self._plan:
            config = self._plan.pop(0)
            key = (tuple(config.pop("_blocks")), config["seed"])
            if key not in self._finetunes_suggested:
                self._finetunes_suggested.add(key)
                return self._suggestion(trial_id, ("finetune", key), config)
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self._live.get(trial_id), tuple) and self._live[trial_id][0] == "search":
            self._latest[trial_id] = {k: result.get(k) for k in ("blocks", "alpha", "num_blocks_total")}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        token = self._complete(trial_id)
        latest = self._latest.pop(trial_id, None)
        if not (isinstance(token, tuple) and token[0] == "search"):
            return
        source = result if result and not error else (latest if not error else None)
        self._search_results[token[1]] = self._read_selection(source)

    @staticmethod
    def _read_selection(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if not result:
            return None
        blocks = parse_blocks(result.get("blocks"))
        alpha = result.get("alpha")
        numeric = isinstance(alpha, list | tuple) and all(map(is_number, alpha))
        alpha = [float(a) for a in alpha] if numeric else []
        total = result.get("num_blocks_total") or len(alpha) or None
        if not blocks or not total:
            return None
        return {"blocks": blocks, "alpha": alpha, "num_blocks_total": int(total)}

    def _finetune_plan(self) -> list[dict[str, Any]]:
        found = [self._search_results[s] for s in self._search_seeds if self._search_results.get(s)]
        if not found:
            return []
        total = found[0]["num_blocks_total"]
        subsets: list[tuple[str, tuple[int, ...]]] = [
            (f"search{s}", r["blocks"]) for s in self._search_seeds if (r := self._search_results.get(s))
        ]
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
        return [
            {"stage": "finetune", "strategy": self.strategy, "variant": variant, "seed": seed,
             "layers": encode_layers(blocks, total), "_blocks": blocks}
            for variant, blocks in subsets for seed in self._finetune_seeds
        ]
