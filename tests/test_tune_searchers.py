"""Layer searchers driven directly (no trials): sequencing, waiting, FINISHED, dedup, tolerance, pickling."""

from __future__ import annotations

import math
import pickle

import pytest
from ray.tune.search import Searcher
from searcher_drive import drain

from flexora_tune.blocks import parse_blocks
from flexora_tune.blocks import top_k_blocks as top_k
from flexora_tune.search import (
    FlexoraSearcher,
    RandomLayerSearcher,
    StaticLayerSearcher,
    decode_layers,
    encode_layers,
    selection_from_config,
    tpe_searcher,
)
from flexora_tune.search.flexora import consensus

L = 6


def search_result(blocks, alpha=None, final=True):
    alpha = alpha if alpha is not None else [float(i in blocks) for i in range(L)]
    return {"blocks": ",".join(map(str, blocks)), "alpha": alpha, "num_blocks_total": L, "final": final,
            "val_accuracy": math.nan}


def blocks_of(config):
    return decode_layers(config["layers"]).blocks


def test_encoding_round_trip_and_both_forms():
    layers = encode_layers([0, 3], 4)
    assert layers == {"l00": 1, "l01": 0, "l02": 0, "l03": 1}
    assert decode_layers(layers).blocks == (0, 3)
    assert selection_from_config({"blocks": [3, 0]}, 4).blocks == (0, 3)
    assert selection_from_config({}, 4) is None
    with pytest.raises(ValueError, match="at least one block"):
        decode_layers(encode_layers([], 4))
    with pytest.raises(ValueError, match="4 blocks"):
        selection_from_config({"layers": encode_layers([1], 5)}, 4)


def test_flexora_searches_first_waits_then_finetunes_selected_subsets():
    searcher = FlexoraSearcher(metric="val_accuracy", mode="max", n_searches=2, neighbours=0)
    assert searcher.planned_trials == 2 + 3
    first, second = searcher.suggest("s0"), searcher.suggest("s1")
    assert (first["stage"], first["seed"], second["seed"]) == ("search", 0, 1)
    assert searcher.suggest("x") is None  # both searches running
    searcher.on_trial_complete("s0", result=search_result([0, 1, 5]))
    assert searcher.suggest("x") is None  # still waiting for s1
    searcher.on_trial_result("s1", search_result([1, 5], final=False))
    searcher.on_trial_complete("s1", result=search_result([1, 2, 5]))
    finetunes = drain(searcher, "f")
    assert [c["stage"] for c in finetunes] == ["finetune"] * 3
    assert [blocks_of(c) for c in finetunes] == [(0, 1, 5), (1, 2, 5), (1, 5)]
    assert [c["variant"] for c in finetunes] == ["search0", "search1", "consensus"]
    assert searcher.suggest("late") == Searcher.FINISHED


def test_flexora_neighbours_and_no_duplicate_finetunes():
    alpha = [0.9, 0.1, 0.8, 0.2, 0.7, 0.0]
    searcher = FlexoraSearcher("val_accuracy", "max", n_searches=2, neighbours=1)
    searcher.suggest("s0"), searcher.suggest("s1")
    searcher.on_trial_complete("s0", result=search_result([0, 2, 4], alpha))
    searcher.on_trial_complete("s1", result=search_result([0, 2, 4], alpha))
    subsets = [blocks_of(c) for c in drain(searcher)]
    assert subsets == [(0, 2, 4), (0, 2), (0, 2, 3, 4)]  # same selection twice and as consensus: once


def test_flexora_defaults_fit_num_samples_4():
    searcher = FlexoraSearcher(metric="val_accuracy", mode="max")
    assert searcher.planned_trials == 4
    assert searcher.suggest("s")["stage"] == "search"
    searcher.on_trial_complete("s", result=search_result([3, 4], [0, 0, 0.1, 0.5, 0.4, 0]))
    assert [blocks_of(c) for c in drain(searcher)] == [(3, 4), (3,), (2, 3, 4)]


def test_flexora_a_search_contributes_only_its_final_report():
    searcher = FlexoraSearcher(n_searches=4, neighbours=0)
    for i in range(4):
        searcher.suggest(f"s{i}")
    searcher.on_trial_complete("ghost", result={"val_accuracy": math.nan})
    searcher.on_trial_complete("s0", result=None, error=True)
    searcher.on_trial_result("s1", search_result([2, 3], final=False))
    searcher.on_trial_complete("s1", result=None)  # killed by HyperBand: no saved selection
    searcher.on_trial_complete("s2", result=search_result([2, 3], final=False))  # cut short by a scheduler
    searcher.on_trial_complete("s2", result=search_result([5]))  # repeated completion: ignored
    searcher.on_trial_result("s3", search_result([1, 2]))  # its final report (selection saved), then an error
    searcher.on_trial_complete("s3", result=None, error=True)
    assert searcher.selections == {3: (1, 2)}
    assert [blocks_of(c) for c in drain(searcher)] == [(1, 2)]


@pytest.mark.parametrize("rerun_id", ["new-id", "s1"])  # restart_errored / resume_errored
def test_flexora_counts_a_search_rerun_by_a_restore(rerun_id):
    searcher = FlexoraSearcher(n_searches=2, neighbours=0)
    searcher.suggest("s0"), searcher.suggest("s1")
    searcher.on_trial_complete("s0", result=search_result([0, 1]))
    searcher.on_trial_complete("s1", result=None, error=True)
    assert blocks_of(searcher.suggest("f0")) == (0, 1)  # the plan, from search 0 alone
    rerun = {**search_result([1, 2], final=False), "stage": "search", "strategy": "flexora", "seed": 1}
    searcher.on_trial_result(rerun_id, rerun)
    assert searcher.suggest("x") is None  # waits for the re-run instead of finishing
    searcher.on_trial_complete(rerun_id, result={**rerun, "final": True})
    late = drain(searcher, "g")
    assert [(c["variant"], blocks_of(c)) for c in late] == [("search1", (1, 2)), ("consensus", (1,))]


def test_flexora_all_searches_failed_finishes():
    searcher = FlexoraSearcher()
    searcher.suggest("s0")
    searcher.on_trial_complete("s0", error=True)
    assert searcher.suggest("x") == Searcher.FINISHED


def test_flexora_save_restore_and_pickle(tmp_path):
    searcher = FlexoraSearcher("val_accuracy", "max", n_searches=1, neighbours=1)
    searcher.suggest("s0")
    searcher.on_trial_complete("s0", result=search_result([1, 2], [0, 1, 1, 0.5, 0, 0]))
    first = searcher.suggest("f0")
    searcher.save(str(tmp_path / "state.pkl"))
    restored = FlexoraSearcher("val_accuracy", "max")
    restored.restore(str(tmp_path / "state.pkl"))
    copy = pickle.loads(pickle.dumps(restored))
    rest = [blocks_of(c) for c in drain(copy)]
    assert blocks_of(first) == (1, 2) and (1, 2) not in rest and len(rest) == 2


def test_random_distinct_seeded_exact_k_and_exhaustion():
    a = drain(RandomLayerSearcher(num_blocks=4, k=2, seed=3))
    b = drain(RandomLayerSearcher(num_blocks=4, k=2, seed=3))
    assert [blocks_of(c) for c in a] == [blocks_of(c) for c in b]
    assert len(a) == 6 and len({blocks_of(c) for c in a}) == 6  # every 2-of-4 subset once, then FINISHED
    anysize = drain(RandomLayerSearcher(num_blocks=3))
    assert len({blocks_of(c) for c in anysize}) == 7
    assert len(drain(RandomLayerSearcher(num_blocks=8, max_trials=5))) == 5
    assert all(c["strategy"] == "random2" for c in a)


def test_random_reads_num_blocks_from_model_config(tiny_llama_dir):
    searcher = RandomLayerSearcher("val_accuracy", "max")
    searcher.set_search_properties(None, None, {"model": str(tiny_llama_dir)})
    assert len(searcher.suggest("t0")["layers"]) == 4
    searcher.on_trial_complete("t0", result={"val_accuracy": math.nan})
    searcher.on_trial_complete("unknown", result=None, error=True)
    pickle.loads(pickle.dumps(searcher)).suggest("t1")


def test_static_rules():
    assert [c.get("layers") for c in drain(StaticLayerSearcher(rule="all", seeds=(0, 1)))] == [None, None]
    assert [blocks_of(c) for c in drain(StaticLayerSearcher(rule="last", k=2, num_blocks=5))] == [(3, 4)]
    assert [blocks_of(c) for c in drain(StaticLayerSearcher(rule="first", k=2, num_blocks=5))] == [(0, 1)]
    listed = drain(StaticLayerSearcher(rule="list", blocks=[[0], [2, 4]], seeds=(0, 1), num_blocks=5))
    assert [(blocks_of(c), c["seed"]) for c in listed] == [((0,), 0), ((0,), 1), ((2, 4), 0), ((2, 4), 1)]
    with pytest.raises(ValueError, match="needs k"):
        StaticLayerSearcher(rule="last")
    with pytest.raises(ValueError, match="domains"):
        from ray import tune

        StaticLayerSearcher().set_search_properties("m", "max", {"lr": tune.uniform(0, 1)})


@pytest.mark.parametrize("k", [None, 2])
def test_tpe_suggests_nonempty_subsets_and_tolerates_nan_errors_early_stop(k):
    searcher = tpe_searcher("val_accuracy", "max", num_blocks=4, k=k, seed=0)
    outcomes = [
        {"val_accuracy": 0.7, "final": True, "training_iteration": 3},
        {"val_accuracy": math.nan, "final": True},
        None,
        {"val_accuracy": 0.2, "final": False, "training_iteration": 1},
        {"final": True},
    ]
    for i, outcome in enumerate(outcomes * 2):
        config = searcher.suggest(f"t{i}")
        assert config["stage"] == "finetune" and len(decode_layers(config["layers"])) >= 1
        if k:
            assert len(decode_layers(config["layers"])) == k
        if outcome:
            searcher.on_trial_result(f"t{i}", {**outcome, "training_iteration": 1})
        searcher.on_trial_complete(f"t{i}", result=outcome, error=outcome is None)
    searcher.on_trial_complete("ghost", result={"val_accuracy": 1.0})
    states = [t.state.name for t in searcher._ot_study.get_trials() if t.state.name != "FAIL" or t.params]
    assert {"COMPLETE", "PRUNED", "FAIL"} <= set(states) and "RUNNING" not in states
    assert pickle.loads(pickle.dumps(searcher)).suggest("again")


def test_tpe_metric_mode_late_and_unique_study(tiny_llama_dir, tmp_path):
    a, b = tpe_searcher(), tpe_searcher()
    assert a._study_name != b._study_name
    with pytest.raises(RuntimeError, match="needs a metric and a mode"):
        a.suggest("t0")
    a.set_search_properties("val_accuracy", "max", {"model": str(tiny_llama_dir)})
    assert len(a.suggest("t0")["layers"]) == 4
    a.save(str(tmp_path / "tpe.pkl"))
    b.restore(str(tmp_path / "tpe.pkl"))
    assert b.suggest("t1")["layers"]


def test_metric_and_mode_come_from_the_tune_config_and_a_conflict_names_both():
    random = RandomLayerSearcher(num_blocks=4)
    random.set_search_properties("val_accuracy", "max", {})
    assert (random.metric, random.mode) == ("val_accuracy", "max")
    flexora = FlexoraSearcher("val_loss", "min")
    flexora.set_search_properties(None, None, {})
    assert (flexora.metric, flexora.mode) == ("val_loss", "min")
    with pytest.raises(ValueError, match=r"metric='val_loss' but the TuneConfig has metric='val_accuracy'"):
        FlexoraSearcher("val_loss").set_search_properties("val_accuracy", "max", {})
    with pytest.raises(ValueError, match=r"mode='min' but the TuneConfig has mode='max'"):
        tpe_searcher(mode="min", num_blocks=4).set_search_properties("val_accuracy", "max", {})


def test_tpe_with_mode_only_learns_the_tune_config_metric():
    searcher = tpe_searcher(num_blocks=4, mode="max", seed=0)
    searcher.set_search_properties("val_accuracy", None, {})
    for i in range(3):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result={"val_accuracy": 0.5 + i / 10, "final": True})
    told = [t for t in searcher._ot_study.get_trials() if t.params and any(t.params.values())]
    assert [(t.state.name, t.value) for t in told] == [("COMPLETE", 0.5), ("COMPLETE", 0.6), ("COMPLETE", 0.7)]
    assert searcher.metric == "val_accuracy"


@pytest.mark.parametrize("make", [
    lambda: StaticLayerSearcher(rule="list", blocks=[[0], [1], [2]], num_blocks=4),
    lambda: RandomLayerSearcher(num_blocks=4, k=1),
    lambda: FlexoraSearcher(n_searches=3),
    lambda: tpe_searcher("val_accuracy", "max", num_blocks=4),
])
def test_searchers_take_max_concurrent_trials_themselves(make):
    searcher = make()
    assert searcher.set_max_concurrency(2)  # True: Tune's ConcurrencyLimiter then leaves the counting to it
    assert searcher.suggest("a") and searcher.suggest("b")
    assert searcher.suggest("c") is None
    searcher.on_trial_complete("a", result={"val_accuracy": 0.5, "final": True}, error=True)
    assert searcher.suggest("c")


def test_helpers():
    assert parse_blocks("0,3, 7") == (0, 3, 7) and parse_blocks([2, 1]) == (1, 2)
    assert parse_blocks(None) is None
    assert consensus([(0, 1), (1, 2), (1, 3)]) == (1,)
    assert consensus([(0,), (1,)]) == (0, 1)
    assert top_k([0.1, 0.5, 0.5, 0.2], 2) == (1, 2)
