"""ArmsSearcher driven by hand (no Tune): tagging and routing, least-served order, deferred arms released by
their Flexora search (or its failure), FINISHED, per-arm budgets and the stopper, concurrency, metric/mode,
save/restore. The real Tune run is in test_search_multiplex_tune.py."""

from __future__ import annotations

import math
import pickle
from functools import partial

import pytest
from ray.tune.search import Searcher

from flexora_tune.search import (
    ArmBudgetStopper,
    ArmsSearcher,
    Deferred,
    FlexoraSearcher,
    RandomLayerSearcher,
    StaticLayerSearcher,
    arm_of_result,
    decode_layers,
)

L = 6


class Recorder(Searcher):
    """Suggests `n` configs, then FINISHED; remembers what it was told."""

    def __init__(self, n: int, strategy: str = "rec", seed: int = 0) -> None:
        super().__init__()
        self.n, self.strategy, self.seed = n, strategy, seed
        self.suggested, self.results, self.completed, self.properties = [], [], [], []

    @property
    def planned_trials(self) -> int:
        return self.n

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self.properties.append((metric, mode, config))
        return True

    def suggest(self, trial_id):
        if len(self.suggested) >= self.n:
            return Searcher.FINISHED
        self.suggested.append(trial_id)
        return {"stage": "finetune", "strategy": self.strategy, "seed": self.seed, "blocks": [len(self.suggested)]}

    def on_trial_result(self, trial_id, result) -> None:
        self.results.append(trial_id)

    def on_trial_complete(self, trial_id, result=None, error=False) -> None:
        self.completed.append((trial_id, error))


def search_final(blocks, seed=0):
    return {"stage": "search", "strategy": "flexora", "seed": seed, "final": True,
            "blocks": ",".join(map(str, blocks)), "alpha": [float(i in blocks) for i in range(L)],
            "num_blocks_total": L, "val_accuracy": -math.inf, "flops": 10.0}


def done(value=0.5, flops=100.0, **extra):
    return {"val_accuracy": value, "final": True, "flops": flops, "compute_s": 1.0, **extra}


def test_configs_are_tagged_and_results_go_to_their_arm_only():
    a, b = Recorder(2, seed=0), Recorder(1, seed=1)
    searcher = ArmsSearcher({"a": a, "b": b})
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [c["arm"] for c in configs] == ["a", "b", "a"]  # least-served first, ties in the order given
    assert searcher.suggest("t3") == Searcher.FINISHED  # every arm is done suggesting; its trials still report
    searcher.on_trial_result("t0", {"val_accuracy": 0.1})
    searcher.on_trial_complete("t1", result=done())
    searcher.on_trial_complete("ghost", result=done())  # never suggested, names no arm: ignored
    searcher.on_trial_complete("t0", result=done())
    searcher.on_trial_complete("t2", result=None, error=True)
    assert (a.results, a.completed, b.completed) == (["t0"], [("t0", False), ("t2", True)], [("t1", False)])
    assert searcher.finished_arms == ["a", "b"] and searcher.trials_of("a") == ["t0", "t2"]


def test_a_trial_unknown_by_id_is_routed_by_its_config_arm():
    a, b = Recorder(1), Recorder(1)
    searcher = ArmsSearcher({"a": a, "b": b})
    searcher.on_trial_result("rerun", {"config/arm": "b", "val_accuracy": 0.3})  # flattened, as Tune sends
    searcher.on_trial_complete("rerun", result={"config/arm": "b", **done()})
    assert b.results == ["rerun"] and b.completed == [("rerun", False)] and not a.completed
    assert arm_of_result({"config": {"arm": "a"}}) == "a" and arm_of_result({"arm": "b"}) == "b"
    assert arm_of_result({}) is None


def test_deferred_arms_start_when_their_flexora_search_reports():
    arms = {
        "flexora_seed0": FlexoraSearcher(search_seeds=[0], finetune_seeds=[0], finetunes=2),
        "random_seed0": Deferred(partial(RandomLayerSearcher, num_blocks=L, seed=0, max_trials=2), "flexora_seed0",
                                 fallback_k=3, planned_trials=2),
        "all_seed0": StaticLayerSearcher(rule="all", num_blocks=L),
    }
    searcher = ArmsSearcher(arms, "val_accuracy", "max")
    assert searcher.planned_trials == 3 + 2 + 1 and searcher.waiting == ["random_seed0"]
    search, static = searcher.suggest("s"), searcher.suggest("a")
    assert (search["stage"], search["arm"], static["arm"]) == ("search", "flexora_seed0", "all_seed0")
    assert searcher.suggest("x") is None  # the search runs; random waits for its k
    searcher.on_trial_result("s", search_final((1, 4)))  # the search's final report releases random at once
    released = searcher.suggest("r0")
    assert released["arm"] == "random_seed0" and len(decode_layers(released["layers"])) == 2
    assert searcher.released_k == {"random_seed0": 2} and searcher.waiting == []
    assert searcher.arms["random_seed0"].metric == "val_accuracy"  # metric and mode passed down when built
    searcher.on_trial_complete("s", result=search_final((1, 4)))
    rest = [searcher.suggest(f"f{i}") for i in range(3)]
    assert sorted(c["arm"] for c in rest) == ["flexora_seed0", "flexora_seed0", "random_seed0"]
    for trial_id in ["a", "r0", "f0", "f1", "f2"]:
        searcher.on_trial_complete(trial_id, result=done())
    assert searcher.suggest("end") == Searcher.FINISHED


@pytest.mark.parametrize("fallback_k", [3, None])
def test_a_failed_search_releases_its_arms_with_the_fallback_or_drops_them(fallback_k):
    arms = {"flexora_seed0": FlexoraSearcher(finetunes=2),
            "random_seed0": Deferred(partial(RandomLayerSearcher, num_blocks=L, max_trials=2), "flexora_seed0",
                                     fallback_k=fallback_k)}
    searcher = ArmsSearcher(arms)
    assert searcher.planned_trials is None  # the deferred arm declared no count
    searcher.suggest("s")
    searcher.on_trial_complete("s", result=None, error=True)
    configs = []
    while (config := searcher.suggest(f"t{len(configs)}")) != Searcher.FINISHED:
        configs.append(config)
        searcher.on_trial_complete(f"t{len(configs) - 1}", result=done())
    assert [len(decode_layers(c["layers"])) for c in configs] == ([3, 3] if fallback_k else [])
    assert searcher.finished_arms == ["flexora_seed0", "random_seed0"]


def test_budgets_stop_suggestions_and_running_trials():
    arms = {"a": StaticLayerSearcher(rule="list", blocks=[[0], [1], [2], [3]], num_blocks=L), "b": Recorder(2)}
    searcher = ArmsSearcher(arms, budget_flops=250.0, budget_s=100.0)
    stopper = ArmBudgetStopper(searcher)
    first = [searcher.suggest(f"t{i}") for i in range(2)]
    assert [c["arm"] for c in first] == ["a", "b"]
    searcher.on_trial_complete("t0", result=done(flops=120.0))
    searcher.suggest("t2")  # arm a again: 120 of 250 spent
    assert not stopper("t2", {"config": {"arm": "a"}, "flops": 100.0})  # 220 < 250: runs on
    searcher.on_trial_result("t2", {"flops": 100.0})
    assert stopper("t2", {"config": {"arm": "a"}, "flops": 140.0})  # 260 >= 250: stop this trial
    assert not stopper("t1", {"config": {"arm": "b"}, "flops": 140.0})  # b's own budget is untouched
    searcher.on_trial_complete("t2", result=done(flops=140.0))
    assert searcher.spent("a") == {"flops": 260.0, "compute_s": 2.0}
    nxt = searcher.suggest("t3")
    assert nxt["arm"] == "b"  # a reached its budget: no new trial of a, ever
    searcher.on_trial_complete("t1", result=done())
    searcher.on_trial_complete("t3", result=done())
    assert searcher.suggest("t4") == Searcher.FINISHED and searcher.finished_arms == ["a", "b"]
    assert not stopper.stop_all()
    with pytest.raises(ValueError, match="budget_flops"):
        ArmsSearcher(arms, budget_flops=0)


def test_max_concurrency_counts_every_arm():
    searcher = ArmsSearcher({"a": Recorder(3), "b": Recorder(3)})
    assert searcher.set_max_concurrency(2)  # True: Tune leaves the counting to it
    assert searcher.suggest("t0") and searcher.suggest("t1")
    assert searcher.suggest("t2") is None
    searcher.on_trial_complete("t0", result=done())
    assert searcher.suggest("t2")["arm"] == "a"


def test_metric_and_mode_reach_every_arm_and_a_conflict_names_both():
    a = Recorder(1)
    searcher = ArmsSearcher({"a": a, "flex": FlexoraSearcher()}, mode="min")
    searcher.set_search_properties("val_loss", None, {"model": "m"})
    assert (searcher.metric, searcher.mode) == ("val_loss", "min")
    assert a.properties == [(None, "min", {}), ("val_loss", "min", {"model": "m"})]
    assert (searcher.arms["flex"].metric, searcher.arms["flex"].mode) == ("val_loss", "min")
    with pytest.raises(ValueError, match=r"mode='max' but the TuneConfig has mode='min'"):
        ArmsSearcher({"flex": FlexoraSearcher("val_loss", "max")}).set_search_properties("val_loss", "min", {})
    with pytest.raises(ValueError, match="waits for arm 'nobody'"):
        ArmsSearcher({"r": Deferred(RandomLayerSearcher, "nobody")})


def test_save_and_restore_continue_the_whole_comparison(tmp_path):
    def make():
        return ArmsSearcher({
            "flexora_seed0": FlexoraSearcher(finetunes=2),
            "random_seed0": Deferred(partial(RandomLayerSearcher, num_blocks=L, max_trials=2), "flexora_seed0",
                                     fallback_k=3, planned_trials=2),
            "all_seed0": StaticLayerSearcher(rule="all", num_blocks=L),
        }, "val_accuracy", "max", budget_flops=1e9)

    searcher = make()
    searcher.suggest("s"), searcher.suggest("a")
    searcher.on_trial_complete("s", result=search_final((0, 2, 5)))
    first = searcher.suggest("f0")
    searcher.save(str(tmp_path / "arms.pkl"))
    restored = make()
    restored.restore(str(tmp_path / "arms.pkl"))
    restored = pickle.loads(pickle.dumps(restored))
    stopper = ArmBudgetStopper(restored)
    configs = [first]
    restored.on_trial_complete("a", result=done())
    restored.on_trial_complete("f0", result=done())
    while (config := restored.suggest(f"g{len(configs)}")) != Searcher.FINISHED:
        assert config is not None and not stopper(f"g{len(configs)}", {**done(), "arm": config["arm"]})
        restored.on_trial_complete(f"g{len(configs)}", result=done())
        configs.append(config)
    arms = sorted(c["arm"] for c in configs)
    assert arms == ["flexora_seed0", "flexora_seed0", "random_seed0", "random_seed0"]  # each planned trial once
    assert {len(decode_layers(c["layers"])) for c in configs if c["arm"] == "random_seed0"} == {3}
    assert restored.spent("flexora_seed0")["flops"] == 10.0 + 2 * 100.0


def test_seeds_complete_one_after_another_when_slots_are_scarce():
    arms = {f"{s}_seed{seed}": Recorder(2, s, seed) for seed in (1, 0) for s in ("x", "y")}
    searcher = ArmsSearcher(arms)
    order = []
    for i in range(8):
        config = searcher.suggest(f"t{i}")
        order.append(config["arm"])
        searcher.on_trial_complete(f"t{i}", result=done())
    assert order == ["x_seed0", "y_seed0", "x_seed0", "y_seed0", "x_seed1", "y_seed1", "x_seed1", "y_seed1"]
    assert searcher.suggest("t8") == Searcher.FINISHED


def test_a_multiplexer_pickled_before_seed_order_restores_and_orders_by_seed():
    searcher = ArmsSearcher({"a_seed1": Recorder(1, "a", 1), "a_seed0": Recorder(1, "a", 0)})
    state = pickle.loads(pickle.dumps(searcher.__dict__))
    state.pop("_seed_rank", None)  # an earlier version kept no seed order
    restored = ArmsSearcher.__new__(ArmsSearcher)
    restored.__dict__.update(state)
    assert restored.suggest("t0")["arm"] == "a_seed0"
