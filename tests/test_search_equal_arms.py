"""Equal arms, driven by hand (no Tune): with T fine-tunes per seed every searching strategy gets exactly T
distinct fine-tunes per seed (Flexora: its search plus T), a static rule its one; Flexora's T are its selection,
then the nearest neighbours by alpha, then further ones."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import combinations

import pytest
from ray.tune.search import Searcher

from flexora_tune.search import (
    ArmsSearcher,
    FlexoraSearcher,
    comparison_arms,
    decode_layers,
    parse_arm,
    planned_finetunes,
)
from flexora_tune.search.arms import arm_name, planned_arm_trials, search_seeds
from flexora_tune.search.flexora import consensus
from flexora_tune.search.neighbours import alpha_neighbours, plan_subsets, ranked_subsets

L = 6
SELECTIONS = {0: (1, 3), 1: (0, 2, 5)}  # search seed -> the subset its search selects
ALPHA = [0.2, 0.9, 0.4, 0.8, 0.1, 0.3]


def search_result(blocks, alpha=ALPHA, total=L):
    return {"stage": "search", "strategy": "flexora", "blocks": ",".join(map(str, blocks)), "alpha": alpha,
            "num_blocks_total": total, "num_blocks": len(blocks), "final": True, "val_accuracy": -math.inf}


def outcome(config):
    """A synthetic trial result for `config`: a search selects SELECTIONS[seed]; a fine-tune scores its subset."""
    if config["stage"] == "search":
        return {**search_result(SELECTIONS[config["seed"]]), "seed": config["seed"]}
    blocks = decode_layers(config["layers"]).blocks if "layers" in config else tuple(range(L))
    return {"stage": "finetune", "strategy": config["strategy"], "seed": config["seed"], "final": True,
            "blocks": ",".join(map(str, blocks)), "num_blocks_total": L, "val_accuracy": 0.5 + 0.01 * sum(blocks)}


def drive(searcher, limit=500):
    """Suggest until FINISHED, completing each trial at once; the configs in order."""
    configs = []
    for i in range(limit):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            return configs
        assert config is not None, "nothing in flight, yet the searcher waits"
        configs.append(config)
        searcher.on_trial_complete(f"t{i}", result=outcome(config))
    raise AssertionError("never finished")


def subset_of(config):
    return decode_layers(config["layers"]).blocks if "layers" in config else tuple(range(L))


@pytest.mark.parametrize("trials", [1, 2, 3, 4])
def test_every_strategy_gets_t_finetunes_per_seed(trials):
    strategies = ["flexora", "random", "tpe", "all", "first-k", "last-k"]
    arms = comparison_arms(strategies, 2, trials, metric="val_accuracy", mode="max", num_blocks=L)
    searcher = ArmsSearcher(arms, "val_accuracy", "max")
    assert searcher.planned_trials == 2 * (1 + 3 * trials + 3)  # per seed: a search, 3 x T, 3 static rules
    configs = drive(searcher)
    assert len(configs) == searcher.planned_trials
    finetunes, searches = defaultdict(list), Counter()
    for config in configs:
        strategy, seed = parse_arm(config["arm"])
        assert config["seed"] == seed
        if config["stage"] == "search":
            searches[config["arm"]] += 1
        else:
            finetunes[(strategy, seed)].append(subset_of(config))
    assert searches == {"flexora_seed0": 1, "flexora_seed1": 1}
    for (strategy, seed), subsets in finetunes.items():
        assert len(subsets) == planned_finetunes(strategy, trials), (strategy, seed)
        assert len(set(subsets)) == len(subsets), (strategy, seed)  # never the same subset twice
        if strategy in ("random", "tpe", "first-k", "last-k"):  # sized by that seed's Flexora selection
            assert {len(s) for s in subsets} == {len(SELECTIONS[seed])}, (strategy, seed)
    assert {key for key in finetunes} == {(s, seed) for s in strategies for seed in (0, 1)}
    assert searcher.released_k == {f"{s}_seed{seed}": len(SELECTIONS[seed])
                                   for s in ("random", "tpe", "first-k", "last-k") for seed in (0, 1)}


@pytest.mark.parametrize("trials", [1, 2, 3, 4])
def test_flexora_plans_exactly_t_finetunes_nearest_first(trials):
    searcher = FlexoraSearcher("val_accuracy", "max", finetunes=trials)
    assert searcher.planned_trials == 1 + trials
    configs = drive(searcher)
    assert [c["stage"] for c in configs] == ["search"] + ["finetune"] * trials
    variants = [(c["variant"], subset_of(c)) for c in configs[1:]]
    expected = [("search0", (1, 3)), ("top1", (1,)), ("top3", (1, 2, 3)), ("top4", (1, 2, 3, 5))]
    assert variants == expected[:trials]


def test_flexora_skips_sizes_outside_the_model_and_goes_on_past_them():
    one_block = FlexoraSearcher(finetunes=4)
    one_block.suggest("s")
    one_block.on_trial_complete("s", result=search_result((1,)))
    assert [c["variant"] for c in drive(one_block)] == ["search0", "top2", "top3", "top4"]  # no top0
    every_block = FlexoraSearcher(finetunes=3)
    every_block.suggest("s")
    every_block.on_trial_complete("s", result=search_result(tuple(range(L))))
    assert [c["variant"] for c in drive(every_block)] == ["search0", "top5", "top4"]  # no top7
    tiny = FlexoraSearcher(finetunes=5)  # 2 blocks: 3 non-empty subsets in all
    tiny.suggest("s")
    tiny.on_trial_complete("s", result=search_result((0,), [0.3, 0.7], total=2))
    assert [(c["variant"], subset_of(c)[:2]) for c in drive(tiny)] == [
        ("search0", (0,)), ("top2", (0, 1)), ("top1", (1,))]  # the top-1 by alpha is not the selection


def test_flexora_finetunes_cover_several_seeds_and_searches():
    searcher = FlexoraSearcher(n_searches=2, finetune_seeds=(0, 1), finetunes=3)
    assert searcher.planned_trials == 2 + 3 * 2
    for i in range(2):
        searcher.suggest(f"s{i}")
        searcher.on_trial_complete(f"s{i}", result=search_result(SELECTIONS[i]))
    finetunes = drive(searcher)
    per_seed = {seed: [(c["variant"], subset_of(c)) for c in finetunes if c["seed"] == seed] for seed in (0, 1)}
    assert per_seed[0] == per_seed[1]
    assert [v for v, _ in per_seed[0]] == ["consensus", "search0", "search1"]  # the pooled evidence first


def test_flexora_with_one_finetune_and_several_searches_tunes_their_consensus():
    searcher = FlexoraSearcher(n_searches=3, finetunes=1)
    picks = [(0, 1, 2), (0, 1, 3), (0, 2, 4)]
    for i, picked in enumerate(picks):
        searcher.suggest(f"s{i}")
        searcher.on_trial_complete(f"s{i}", result=search_result(picked))
    assert [(c["variant"], subset_of(c)) for c in drive(searcher)] == [("consensus", consensus(picks))]
    assert consensus(picks) == (0, 1, 2)


def test_comparison_arm_with_several_searches_uses_distinct_search_seeds():
    arms = comparison_arms(["flexora", "random"], [3], 2, metric="val_accuracy", mode="max", num_blocks=6,
                           searches=3)
    flexora = arms[arm_name("flexora", 3)]
    assert search_seeds(3, 3) == [3, 1003, 2003]
    assert flexora.planned_trials == 3 + 2
    seeds = [flexora.suggest(f"s{i}")["seed"] for i in range(3)]
    assert seeds == [3, 1003, 2003]
    assert arms[arm_name("random", 3)].planned_trials == planned_arm_trials("random", 2, searches=3) == 2
    with pytest.raises(ValueError, match="searches"):
        comparison_arms(["flexora"], 1, 1, metric="val_accuracy", mode="max", num_blocks=6, searches=0)


def test_flexora_a_late_selection_takes_a_neighbours_place():
    searcher = FlexoraSearcher(n_searches=2, finetunes=3)
    searcher.suggest("s0"), searcher.suggest("s1")
    searcher.on_trial_complete("s0", result=search_result((1, 3)))
    searcher.on_trial_complete("s1", result=None, error=True)
    first = searcher.suggest("f0")
    assert (first["variant"], subset_of(first)) == ("search0", (1, 3))
    rerun = {**search_result((0, 2, 5)), "seed": 1}  # search 1 re-run by a restore, under a new id
    searcher.on_trial_result("again", {**rerun, "final": False})
    searcher.on_trial_complete("f0", result=outcome(first))
    searcher.on_trial_complete("again", result=rerun)
    rest = [c["variant"] for c in drive(searcher)]
    assert rest == ["consensus", "search1"]  # still 3 fine-tunes in all: the neighbours gave way


def test_neighbour_ranking():
    for size in range(1, L + 1):
        ranked = list(ranked_subsets(ALPHA, size))
        assert sorted(ranked) == sorted(combinations(range(L), size))
        totals = [sum(ALPHA[b] for b in s) for s in ranked]
        assert totals == sorted(totals, reverse=True)
    everything = [s for _, s in alpha_neighbours((1, 3), ALPHA, L)]
    assert len(everything) == 2**L - 2 and (1, 3) not in everything  # every other subset, once
    no_alpha = [s for _, s in alpha_neighbours((1, 3), None, 4)][:2]
    assert no_alpha == [(1,), (0, 1, 3)]  # membership stands in: inside, then around the selection
    assert plan_subsets([("a", (1,)), ("b", (1,))], (1,), ALPHA, L, 2) == [("a", (1,)), ("top2", (1, 3))]
