"""Fixed block subsets: all blocks (plain LoRA, the reference baseline), first k, last k, or a list."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ray.tune.search import Searcher

from ..blocks import BlockSelection
from .base import LayerSearcher, tune_trials
from .encoding import encode_layers

Rule = Literal["all", "first", "last", "list"]


class StaticLayerSearcher(LayerSearcher):
    """Suggest fixed subsets, each once per seed in `seeds`, then `Searcher.FINISHED`.

    `rule`: ``"all"`` (every block), ``"first"``/``"last"`` (the first/last `k` blocks) or ``"list"`` (the
    subset `blocks`, or several subsets as a list of lists). Results carry ``strategy`` ``all``,
    ``first<k>``, ``last<k>`` or ``list``.

    A static rule is one fine-tune per seed by definition: it names one subset, and a second fine-tune of the
    same subset with the same seed (same data order, same initialisation) would repeat the first. So in a
    comparison with T fine-tunes per seed, a rule's arm is that single fine-tune; seeds are what repeat it.
    """

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        rule: Rule = "all",
        k: int | None = None,
        blocks: Sequence[int] | Sequence[Sequence[int]] | None = None,
        seeds: Sequence[int] = (0,),
        num_blocks: int | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(metric, mode, num_blocks=num_blocks, base_config=base_config)
        if rule not in ("all", "first", "last", "list"):
            raise ValueError(f"rule must be 'all', 'first', 'last' or 'list', got {rule!r}")
        if rule in ("first", "last") and (not isinstance(k, int) or k < 1):
            raise ValueError(f"rule {rule!r} needs k >= 1 blocks, got k={k!r}")
        if rule == "list":
            if not blocks:
                raise ValueError("rule 'list' needs blocks=[...] (one subset) or [[...], [...]] (several)")
            subsets = [list(b) for b in blocks] if isinstance(blocks[0], Sequence) else [list(blocks)]
            for subset in subsets:
                if not subset or len(set(subset)) != len(subset):
                    raise ValueError(f"each subset must be non-empty with no repeats, got {subset}")
            self._subsets: list[list[int]] | None = subsets
        else:
            self._subsets = None
        if not seeds:
            raise ValueError("seeds must name at least one seed")
        self._rule, self._k, self._seeds = rule, k, [int(s) for s in seeds]
        self._next = 0

    @property
    def label(self) -> str:
        return f"{self._rule}{self._k}" if self._rule in ("first", "last") else self._rule

    def _plan(self) -> list[dict[str, Any]]:
        if self._rule == "all":
            subsets: list[list[int] | None] = [None]
        elif self._rule == "list":
            subsets = list(self._subsets or [])
        else:
            total = self.num_blocks
            if self._k > total:
                raise ValueError(f"k={self._k} exceeds the model's {total} blocks")
            subsets = [list(range(self._k)) if self._rule == "first" else list(range(total - self._k, total))]
        plan = []
        for subset in subsets:
            for seed in self._seeds:
                config: dict[str, Any] = {"stage": "finetune", "strategy": self.label, "seed": seed}
                if subset is not None:
                    total = self.num_blocks
                    BlockSelection(tuple(subset), total)  # validates against the model
                    config["layers"] = encode_layers(subset, total)
                plan.append(config)
        return plan

    @property
    def planned_trials(self) -> int:
        return (1 if self._rule != "list" else len(self._subsets or [])) * len(self._seeds)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        plan = self._plan()
        if self._next >= len(plan):
            return Searcher.FINISHED
        if self.at_capacity(tune_trials()):
            return None
        config = plan[self._next]
        self._next += 1
        return self._suggestion(trial_id, config)
