"""The arms of a comparison, equal by construction: with T fine-tunes per seed, every searching strategy gets
exactly T fine-tunes per seed (Flexora: its search plus T; a probe: its probe trial plus T), and a static rule its
one fine-tune."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from ray.tune.search import Searcher

from .flexora import FlexoraSearcher
from .multiplex import Deferred, arm_name
from .probe import ProbeSearcher
from .random_subsets import RandomLayerSearcher
from .static import StaticLayerSearcher
from .tpe import tpe_searcher

#: The strategies an arm can run (compare's names).
ARM_STRATEGIES = ("flexora", "random", "tpe", "all", "first-k", "last-k", "lora-norm", "grad-norm")
#: Strategies that rank the blocks with one cheap probe trial (`probes.py`) before their fine-tunes.
PROBE_STRATEGIES = ("lora-norm", "grad-norm")
#: Strategies whose searcher takes a subset size k.
SIZED = ("random", "tpe", "first-k", "last-k", *PROBE_STRATEGIES)
#: Seed step between the searches of one Flexora arm (`search_seeds`).
SEARCH_SEED_STRIDE = 1000
_STATIC_RULES = {"all": "all", "first-k": "first", "last-k": "last"}


def planned_finetunes(strategy: str, trials: int) -> int:
    """Fine-tunes per seed of `strategy` in a comparison with `trials` per seed: `trials`, or 1 for a static rule
    (one subset: a second fine-tune with the same seed would repeat the first)."""
    return 1 if strategy in _STATIC_RULES else trials


def planned_arm_trials(strategy: str, trials: int, searches: int = 1) -> int:
    """Trials per seed of `strategy`'s arm: its fine-tunes (`planned_finetunes`), plus the trials that size them
    (Flexora: its `searches`; lora-norm, grad-norm: one probe)."""
    sizing = searches if strategy == "flexora" else 1 if strategy in PROBE_STRATEGIES else 0
    return planned_finetunes(strategy, trials) + sizing


def search_seeds(seed: int, searches: int) -> list[int]:
    """The search seeds of seed `seed`'s Flexora arm: `seed`, then `seed` + 1000, + 2000, ... (distinct from
    every other arm's for any comparison of fewer than 1000 seeds, so no two searches repeat each other)."""
    return [seed + SEARCH_SEED_STRIDE * i for i in range(searches)]


def comparison_arms(
    strategies: Iterable[str],
    seeds: int | Sequence[int],
    trials: int,
    *,
    metric: str,
    mode: str,
    num_blocks: int,
    k: int | None = None,
    searches: int = 1,
) -> dict[str, Searcher | Deferred]:
    """One arm per (seed, strategy), named by `arm_name`, for `multiplex.ArmsSearcher`:

    - ``flexora``: its `searches` searches (`search_seeds`), then `trials` distinct fine-tunes, the searches'
      consensus first when there are several (``FlexoraSearcher(finetunes=trials)``);
    - ``random`` / ``tpe``: `trials` distinct subsets of exactly k blocks (TPE: its small-budget sampler);
    - ``lora-norm`` / ``grad-norm``: one probe trial, then `trials` distinct fine-tunes: its top-k blocks, then
      the nearest subsets by its scores (`probe.ProbeSearcher`);
    - ``first-k`` / ``last-k`` / ``all``: the rule's one fine-tune.

    k is `k`, else the size Flexora selects for that seed (a `Deferred` arm, released by the search; half the
    blocks if that search fails; its first search when there are several), else half the blocks when Flexora is
    not compared. Every arm fine-tunes with its seed, so seed s of every strategy sees the same data order.
    """
    strategies = list(strategies)
    unknown = sorted(set(strategies) - set(ARM_STRATEGIES))
    if unknown or not strategies:
        raise ValueError(f"unknown strategies {unknown or '(none given)'}; choose from {', '.join(ARM_STRATEGIES)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if isinstance(searches, bool) or not isinstance(searches, int) or not 1 <= searches < SEARCH_SEED_STRIDE:
        raise ValueError(f"searches must be an int in 1..{SEARCH_SEED_STRIDE - 1}, got {searches!r}")
    half = max(1, num_blocks // 2)
    arms: dict[str, Searcher | Deferred] = {}
    for seed in (range(seeds) if isinstance(seeds, int) else seeds):
        flexora = arm_name("flexora", seed)
        for strategy in sorted(strategies, key=lambda s: s != "flexora"):
            name = arm_name(strategy, seed)
            factory = _factory(strategy, seed, trials, metric, mode, num_blocks, searches)
            if strategy not in SIZED:
                arms[name] = factory()
            elif k is not None:
                arms[name] = factory(k=k)
            elif "flexora" in strategies:
                arms[name] = Deferred(factory, after=flexora, fallback_k=half,
                                      planned_trials=planned_arm_trials(strategy, trials, searches))
            else:
                arms[name] = factory(k=half)
    return arms


def _factory(strategy: str, seed: int, trials: int, metric: str, mode: str, num_blocks: int,
             searches: int = 1) -> Any:
    """A picklable constructor of `strategy`'s searcher for `seed` (taking ``k=`` when the strategy is sized)."""
    if strategy == "flexora":
        return partial(FlexoraSearcher, metric, mode, search_seeds=search_seeds(seed, searches),
                       finetune_seeds=[seed], finetunes=trials)
    if strategy == "random":
        return partial(RandomLayerSearcher, metric, mode, seed=seed, trial_seed=seed, max_trials=trials,
                       num_blocks=num_blocks)
    if strategy == "tpe":
        return partial(tpe_searcher, metric, mode, seed=seed, trial_seed=seed, max_trials=trials,
                       num_blocks=num_blocks)
    if strategy in PROBE_STRATEGIES:
        return partial(ProbeSearcher, metric, mode, probe=strategy, seed=seed, finetunes=trials,
                       num_blocks=num_blocks)
    rule = _STATIC_RULES[strategy]
    return partial(StaticLayerSearcher, metric, mode, rule=rule, seeds=[seed], num_blocks=num_blocks)
