"""A comparison as one real Tune experiment (the tiny model, the shared Ray session): 2 strategies x 2 seeds
multiplexed by ArmsSearcher with 4 trials at once; every arm gets exactly its planned trials, random's subsets
sized by that seed's Flexora selection, released by it; and the budget stopper ends an arm's trial in a real run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from ray import tune

from flexora_tune import trainable
from flexora_tune.results import ARM
from flexora_tune.search import ArmBudgetStopper, ArmsSearcher, StaticLayerSearcher, comparison_arms, parse_arm

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

FAST = {"max_steps": 4, "eval_every": 2, "batch_size": 8, "steps": 4, "report_every": 2}


def arm_trainable(config):
    """The trainable, given the config without the arm tag (the multiplexer's routing key)."""
    trainable({key: value for key, value in config.items() if key != ARM})


@pytest.fixture
def base(tiny_llama_dir, tiny_csv):
    return {"model": str(tiny_llama_dir), "task": {"source": str(tiny_csv), "max_length": 32}, **FAST}


def fit(searcher, base, tmp_path, name, num_samples, stop=None, max_concurrent=4):
    tuner = tune.Tuner(
        tune.with_resources(arm_trainable, {"cpu": 0.5}), param_space=base,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0, stop=stop),
    )
    grid = tuner.fit()
    assert not grid.errors
    return grid


def subset(blocks: str) -> tuple[int, ...]:
    return tuple(int(b) for b in blocks.split(","))


def most_in_flight(df) -> int:
    events = sorted([(t, 1) for t in df["start_time"]] + [(t, -1) for t in df["report_time"]])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_two_strategies_two_seeds_in_one_experiment(base, tmp_path):
    arms = comparison_arms(["flexora", "random"], 2, 2, metric="val_accuracy", mode="max", num_blocks=4)
    searcher = ArmsSearcher(arms, "val_accuracy", "max")
    df = fit(searcher, base, tmp_path, "arms", searcher.planned_trials, stop=ArmBudgetStopper(searcher)).get_dataframe()
    assert len(df) == searcher.planned_trials == 2 * (1 + 2 + 2)
    assert sorted(df[f"config/{ARM}"].unique()) == sorted(arms)
    for seed in (0, 1):
        rows = df[df["seed"] == seed]
        assert set(rows[f"config/{ARM}"].map(lambda a: parse_arm(a)[1])) == {seed}
        search = rows[rows["stage"] == "search"]
        assert len(search) == 1 and search["final"].all()
        selected = subset(search["blocks"].iloc[0])
        flexora = rows[(rows["stage"] == "finetune") & (rows["strategy"] == "flexora")]
        tuned = [subset(b) for b in flexora["blocks"]]
        assert len(tuned) == 2 and len(set(tuned)) == 2 and selected in tuned
        random = rows[rows[f"config/{ARM}"] == f"random_seed{seed}"]
        drawn = [subset(b) for b in random["blocks"]]
        assert len(drawn) == 2 and len(set(drawn)) == 2 and {len(b) for b in drawn} == {len(selected)}
        assert random["start_time"].min() > search["report_time"].max()  # released by that seed's search
    assert searcher.released_k == {f"random_seed{s}": len(subset(df[(df["seed"] == s) & (df["stage"] == "search")]
                                                                 ["blocks"].iloc[0])) for s in (0, 1)}
    assert most_in_flight(df) >= 2  # arms overlap (4 slots on the shared 2-core session)


class InterruptAfterFirst(tune.Callback):
    """Sends this process SIGINT (as Ctrl+C would) when the first trial completes; once."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGINT)


def test_a_resumed_run_keeps_the_arm_budget(base, tmp_path):
    """One arm of three subsets with a budget of one and a bit fine-tunes, interrupted after its first trial and
    restored: the stopper (restored with the searcher) ends the second trial at its first report, and the third
    never starts."""
    probe = fit(ArmsSearcher({"a": StaticLayerSearcher("val_accuracy", "max", rule="list", blocks=[[0]],
                                                      num_blocks=4)}), base, tmp_path, "probe", 1)
    first_report, whole = probe[0].metrics_dataframe["flops"]  # a 1-block fine-tune's two reports
    arm = StaticLayerSearcher("val_accuracy", "max", rule="list", blocks=[[0], [0, 1], [0, 2]], num_blocks=4)
    budget = whole + first_report / 2  # the first fine-tune fits; the second's (costlier) first report reaches it
    searcher = ArmsSearcher({"a": arm}, "val_accuracy", "max", budget_flops=budget)
    trainable_ = tune.with_resources(arm_trainable, {"cpu": 0.5})
    interrupted = tune.Tuner(
        trainable_, param_space=base,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=3, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name="budget", storage_path=str(tmp_path), verbose=0,
                                  stop=ArmBudgetStopper(searcher),
                                  callbacks=[InterruptAfterFirst(str(tmp_path / "interrupted"))]),
    ).fit()
    assert [r.metrics.get("final") for r in interrupted if r.metrics.get("final")] == [True]  # only the first done
    grid = tune.Tuner.restore(str(tmp_path / "budget"), trainable=trainable_, resume_unfinished=True).fit()
    df = grid.get_dataframe()
    assert not grid.errors and len(df) == 2  # the third subset never starts: the arm spent its budget
    first, second = df.sort_values("start_time").to_dict("records")
    assert first["final"] and not second["final"] and second["step"] == 2  # stopped at its first report
    assert first["flops"] + second["flops"] >= budget > first["flops"] == whole
