"""TPE at small budgets, driven by hand (no Tune): a TPE sampler configured for few trials, random only for its
start-up trials, distinct proposals, and proposals that find a planted best subset clearly more often than
random search does."""

from __future__ import annotations

import math
import pickle

import optuna
import pytest
from ray.tune.search import Searcher

from flexora_tune.search import RandomLayerSearcher, decode_layers, startup_trials, tpe_searcher

PLANTED = (1, 4, 6)  # of 8 blocks, 3 chosen: 56 subsets


def planted_value(blocks) -> float:
    """One subset scores far higher (1.0); the others 0.3 plus a little per planted block they share."""
    return 1.0 if tuple(blocks) == PLANTED else 0.3 + 0.1 * len(set(blocks) & set(PLANTED)) / len(PLANTED)


def proposals(searcher, n=12) -> list[tuple[int, ...]]:
    found = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        blocks = decode_layers(config["layers"]).blocks
        found.append(blocks)
        searcher.on_trial_complete(f"t{i}", result={"val_accuracy": planted_value(blocks), "final": True})
    return found


def test_the_sampler_is_tpe_for_small_budgets():
    assert [startup_trials(t) for t in (1, 3, 8, 9, 11, 12, 40, None)] == [2, 2, 2, 3, 3, 4, 4, 4]
    searcher = tpe_searcher("val_accuracy", "max", num_blocks=8, k=3, seed=0, max_trials=3)
    searcher.set_max_concurrency(4)
    searcher.suggest("t0")
    sampler = searcher.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and searcher.n_startup_trials == 2
    assert searcher.sampler_options == {"n_startup_trials": 2, "multivariate": True, "constant_liar": True, "seed": 0}
    sequential = tpe_searcher("val_accuracy", "max", num_blocks=8, seed=0)
    sequential.set_max_concurrency(1)
    assert sequential.sampler_options["constant_liar"] is False and sequential.n_startup_trials == 4
    custom = tpe_searcher("val_accuracy", "max", num_blocks=8, sampler=optuna.samplers.RandomSampler(seed=0))
    custom.suggest("t0")
    assert isinstance(custom.sampler, optuna.samplers.RandomSampler)


def test_random_draws_only_for_the_startup_trials(monkeypatch):
    asked = []
    original = optuna.samplers.RandomSampler.sample_independent

    def spy(self, study, trial, name, distribution):
        asked.append(trial.number)
        return original(self, study, trial, name, distribution)

    monkeypatch.setattr(optuna.samplers.RandomSampler, "sample_independent", spy)
    searcher = tpe_searcher("val_accuracy", "max", num_blocks=8, k=3, seed=0, max_trials=12)
    proposals(searcher, 12)
    completed = [t.number for t in searcher.study.get_trials() if t.state.name == "COMPLETE"]
    assert len(completed) == 12 and searcher.n_startup_trials == 4
    assert sorted(set(asked)) == completed[:4]  # the first 4 are random draws; TPE models every later one


def test_tpe_finds_a_planted_subset_clearly_more_often_than_random():
    seeds = range(20)
    tpe_runs = [proposals(tpe_searcher("val_accuracy", "max", num_blocks=8, k=3, seed=s, max_trials=12))
                for s in seeds]
    random_runs = [proposals(RandomLayerSearcher("val_accuracy", "max", num_blocks=8, k=3, seed=s, max_trials=12))
                   for s in seeds]
    for runs in (tpe_runs, random_runs):
        assert all(len(set(run)) == 12 and {len(b) for b in run} == {3} for run in runs)  # 12 distinct, exact k
    tpe_hits = sum(PLANTED in run for run in tpe_runs)
    random_hits = sum(PLANTED in run for run in random_runs)
    assert tpe_hits >= 2 * random_hits and tpe_hits >= 7, (tpe_hits, random_hits)  # random expects 12/56 of 20
    late_overlap = {name: sum(len(set(b) & set(PLANTED)) for run in runs for b in run[6:]) / (6 * len(seeds))
                    for name, runs in (("tpe", tpe_runs), ("random", random_runs))}
    assert late_overlap["tpe"] > late_overlap["random"] + 0.2, late_overlap  # its later proposals concentrate


def test_distinct_until_the_space_is_used_up_then_finished_at_max_trials():
    searcher = tpe_searcher("val_accuracy", "max", num_blocks=4, k=2, seed=0, max_trials=6)
    subsets = proposals(searcher, 6)
    assert sorted(subsets) == sorted({(a, b) for a in range(4) for b in range(a + 1, 4)})  # all 6, once each
    assert searcher.suggest("more") == Searcher.FINISHED
    assert searcher.planned_trials == 6
    assert "RUNNING" not in {t.state.name for t in searcher.study.get_trials()}


def test_points_to_evaluate_come_first_in_either_space():
    exact = tpe_searcher("val_accuracy", "max", num_blocks=4, k=2, seed=0, points_to_evaluate=[{"blocks": [0, 3]}])
    anysize = tpe_searcher("val_accuracy", "max", num_blocks=4, seed=0,
                           points_to_evaluate=[{"layers/l00": 0, "layers/l01": 1, "layers/l02": 0, "layers/l03": 0}])
    assert decode_layers(exact.suggest("a")["layers"]).blocks == (0, 3)
    assert decode_layers(anysize.suggest("a")["layers"]).blocks == (1,)
    with pytest.raises(ValueError, match="needs 2 blocks"):
        tpe_searcher("val_accuracy", "max", num_blocks=4, k=2, points_to_evaluate=[{"blocks": [0]}]).suggest("a")


def test_reruns_and_restores_are_told_without_leaving_a_trial_running(tmp_path):
    searcher = tpe_searcher("val_accuracy", "max", num_blocks=4, k=2, seed=0)
    config = searcher.suggest("a")
    blocks = ",".join(map(str, decode_layers(config["layers"]).blocks))
    result = {"val_accuracy": 0.6, "final": True, "strategy": "tpe2", "blocks": blocks, "num_blocks_total": 4}
    searcher.on_trial_complete("a", result=None, error=True)
    searcher.on_trial_complete("a", result=result)  # resume_errored: the same id, now finished
    searcher.on_trial_complete("new-id", result={**result, "val_accuracy": 0.7})  # restart_errored: a new id
    searcher.save(str(tmp_path / "tpe.pkl"))
    restored = tpe_searcher()
    restored.restore(str(tmp_path / "tpe.pkl"))
    states = [(t.state.name, t.value) for t in pickle.loads(pickle.dumps(restored)).study.get_trials()]
    assert states == [("FAIL", None), ("COMPLETE", 0.6), ("COMPLETE", 0.7)]
    assert math.isclose(restored.study.best_value, 0.7)


def test_the_first_modelled_proposal_waits_for_the_startup_results(monkeypatch):
    asked = []
    original = optuna.samplers.RandomSampler.sample_independent
    monkeypatch.setattr(optuna.samplers.RandomSampler, "sample_independent",
                        lambda self, study, trial, *a: asked.append(trial.number) or original(self, study, trial, *a))
    searcher = tpe_searcher("val_accuracy", "max", num_blocks=8, k=3, seed=0, max_trials=3)  # 2 start-up trials
    assert searcher.suggest("a") and searcher.suggest("b")  # both start-up draws run at once
    assert searcher.suggest("c") is None  # a third now would be random too: wait
    searcher.on_trial_complete("a", result={"val_accuracy": 0.4, "final": True})
    assert searcher.suggest("c") is None
    searcher.on_trial_complete("b", result={"val_accuracy": 0.6, "final": True})
    drawn = len(asked)
    assert searcher.suggest("c") and len(asked) == drawn  # TPE's: the random sampler was not asked
    failing = tpe_searcher("val_accuracy", "max", num_blocks=8, k=3, seed=0, max_trials=3)
    failing.suggest("a"), failing.suggest("b")
    failing.on_trial_complete("a", result=None, error=True)
    failing.on_trial_complete("b", result={"val_accuracy": 0.6, "final": True})
    assert failing.suggest("c")  # one result only, nothing running: go on rather than wait for ever
