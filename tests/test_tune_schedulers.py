"""Search trials beside fine-tunes under every supported Tune scheduler (real Ray, the tiny model): searches are
never compared with fine-tunes, their reports carry no fine-tune metric value, PBT is refused at start, and the
result grid's filtered DataFrame works with search trials in it."""

from __future__ import annotations

import math

import pytest
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)
from ray.tune.search import Searcher

from flexora_tune import FlexoraSearcher, StaticLayerSearcher, tpe_searcher, trainable
from flexora_tune.results import FINETUNE_METRICS, FINETUNE_STEP, SEARCH_TRAIN_LOSS, SEARCH_VAL_LOSS
from flexora_tune.search.flexora import consensus

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

FAST = {"max_steps": 4, "eval_every": 2, "batch_size": 8, "steps": 4, "report_every": 2}


@pytest.fixture
def base(tiny_llama_dir, tiny_csv):
    return {"model": str(tiny_llama_dir), "task": {"source": str(tiny_csv), "max_length": 32}, **FAST}


class InTurn(Searcher):
    """Several searchers in one experiment, asked in turn (each at most `limits[i]` trials): one's search trials
    run among another's fine-tunes, as in a comparison run as a single experiment."""

    def __init__(self, children: list[Searcher], limits: list[int | None]) -> None:
        super().__init__()
        self.children, self.limits, self.owner, self.finished, self.turn = children, limits, {}, set(), 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return all(child.set_search_properties(metric, mode, config, **spec) for child in self.children)

    def suggest(self, trial_id):
        for _ in range(len(self.children)):
            index, self.turn = self.turn % len(self.children), self.turn + 1
            if index in self.finished:
                continue
            config = self.children[index].suggest(trial_id)
            if config == Searcher.FINISHED:
                self.finished.add(index)
            elif config is not None:
                self.owner[trial_id] = index
                if list(self.owner.values()).count(index) == self.limits[index]:
                    self.finished.add(index)
                return config
        return Searcher.FINISHED if len(self.finished) == len(self.children) else None

    def on_trial_result(self, trial_id, result) -> None:
        if trial_id in self.owner:
            self.children[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False) -> None:
        if trial_id in self.owner:
            self.children[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)


def subset(blocks: str) -> tuple[int, ...]:
    return tuple(int(b) for b in blocks.split(","))


SCHEDULERS = {  # each with a metric (its own, or the TuneConfig's) that fine-tunes report and searches hold
    "fifo": (None, {"metric": "val_accuracy"}),
    "asha": (lambda: ASHAScheduler(time_attr=FINETUNE_STEP, metric="train_loss", mode="min", grace_period=1,
                                   reduction_factor=2, max_t=4), {}),
    "median": (lambda: MedianStoppingRule(time_attr=FINETUNE_STEP, grace_period=1, min_samples_required=1),
               {"metric": "val_loss", "mode": "min"}),
    "hyperband": (lambda: HyperBandScheduler(time_attr=FINETUNE_STEP, max_t=4, reduction_factor=2),
                  {"metric": "val_accuracy", "mode": "max"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_searches_among_finetunes_finish_under_each_scheduler(name, base, tmp_path):
    """A fine-tune of another searcher first, then two Flexora searches (each reporting after a fine-tune did),
    then their fine-tunes: under each scheduler no search is stopped and every planned trial runs. The FIFO run
    also has TPE as the other searcher, with only a mode: it takes the TuneConfig's metric."""
    make_scheduler, metric_mode = SCHEDULERS[name]
    flexora = FlexoraSearcher(n_searches=2, neighbours=0)
    other = tpe_searcher(num_blocks=4, mode="max", seed=0) if name == "fifo" else StaticLayerSearcher(
        rule="list", blocks=[[0]])
    tuner = tune.Tuner(
        trainable, param_space=base,
        tune_config=tune.TuneConfig(search_alg=InTurn([other, flexora], [1, None]),
                                    num_samples=flexora.planned_trials + 1, max_concurrent_trials=1,
                                    scheduler=make_scheduler() if make_scheduler else None, reuse_actors=True,
                                    **metric_mode),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors
    df = grid.get_dataframe()
    searches, finetunes = df[df["stage"] == "search"], df[df["stage"] == "finetune"]
    assert len(searches) == 2 and searches["final"].all()  # no search stopped, by any comparison
    assert searches["start_time"].min() > finetunes["report_time"].min()  # a fine-tune had reported before
    selections = [subset(b) for b in searches.sort_values("seed")["blocks"]]
    planned = set(selections) | {consensus(selections)}
    flexora_tuned = [subset(b) for b in finetunes[finetunes["strategy"] == "flexora"]["blocks"]]
    assert sorted(flexora_tuned) == sorted(planned)  # every search's selection (and the consensus), once
    assert len(finetunes[finetunes["strategy"] != "flexora"]) == 1  # the other searcher's fine-tune
    if name == "fifo":
        check_search_reports(grid)
        best = grid.get_dataframe(filter_metric="val_accuracy", filter_mode="max")  # pandas 3: no all-NaN column
        assert sorted(best["stage"]) == sorted(df["stage"]) and best["trial_id"].is_unique
        told = [t for t in other._ot_study.get_trials() if t.params and any(t.params.values())]
        tpe_result = finetunes[finetunes["strategy"] == "tpe"].iloc[0]
        assert [(t.state.name, t.value) for t in told] == [("COMPLETE", tpe_result["val_accuracy"])]


def check_search_reports(grid) -> None:
    """Every search report holds the fine-tune metrics only as placeholders that are no value (so no scheduler
    on them could rank a search), 0 as the scheduler time attribute, and its own losses by their own names."""
    for result in grid:
        history = result.metrics_dataframe
        if result.metrics["stage"] == "search":
            for key in FINETUNE_METRICS:
                assert not history[key].map(math.isfinite).any(), key
            assert (history[FINETUNE_STEP] == 0).all()
            running = history[~history["final"]]
            assert running[SEARCH_TRAIN_LOSS].map(math.isfinite).all()
            assert running[SEARCH_VAL_LOSS].map(math.isfinite).all()
        else:
            assert (history[FINETUNE_STEP] == history["step"]).all() and (history[FINETUNE_STEP] > 0).all()
            assert history["val_accuracy"].map(math.isfinite).all()


def test_pbt_is_refused_before_any_trial(base, tmp_path):
    pbt = PopulationBasedTraining(time_attr=FINETUNE_STEP, metric="val_accuracy", mode="max",
                                  hyperparam_mutations={"lr": [1e-4, 1e-3]})
    tuner = tune.Tuner(
        trainable, param_space=base,
        tune_config=tune.TuneConfig(search_alg=FlexoraSearcher(), scheduler=pbt, num_samples=4),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="pbt", verbose=0),
    )
    with pytest.raises(ValueError, match="Search algorithms cannot be used with PopulationBasedTraining"):
        tuner.fit()
    assert not [p for p in (tmp_path / "pbt").iterdir() if p.is_dir()]  # no trial started
