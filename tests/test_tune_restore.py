"""An interrupted FlexoraSearcher sweep restored with each `Tuner.restore` option (real Ray, the tiny model): it
ends with exactly the planned fine-tunes, each search's selection fine-tuned once, and without waiting on a trial
that will never report."""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray import tune

from flexora_tune import FlexoraSearcher, trainable
from flexora_tune.search.flexora import consensus

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

FAST = {"max_steps": 4, "eval_every": 2, "batch_size": 8, "steps": 4, "report_every": 2}
SEARCH_ORDER = [2, 1, 0]  # search 2 finishes, search 1 fails on its first attempt, search 0 is cut by Ctrl+C


def fails_once(config):
    """The real trainable, except that search seed 1 fails on its first attempt (a marker file remembers it)."""
    marks = Path(config.pop("marks"))
    if config.get("stage") == "search" and config.get("seed") == 1 and not (marks / "failed").exists():
        (marks / "failed").touch()
        raise RuntimeError("planned failure")
    trainable(config)


class InterruptSearch(tune.Callback):
    """Sends this process SIGINT (as Ctrl+C would) at the first, unfinished report of search seed 0; once."""

    def __init__(self, marker: str) -> None:
        self.marker, self.staging = marker, None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.staging = trial.storage.experiment_driver_staging_path
        if result.get("stage") == "search" and result.get("seed") == 0 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGINT)


@dataclass
class Interrupted:
    path: Path  # the experiment folder (a restore must use this path: Ray keeps it for the searcher's new trials)
    pristine: Path  # a copy of it as the interruption left it
    staging: str  # Ray's driver staging folder of this experiment, which restores of one experiment share

    def reset(self) -> None:
        """Put the interrupted state back, so each restore option starts from it."""
        shutil.rmtree(self.path)
        shutil.copytree(self.pristine, self.path)
        shutil.rmtree(self.staging, ignore_errors=True)  # else a restore reads the previous restore's state


@pytest.fixture(scope="module")
def interrupted(ray_session, tiny_llama_dir, tiny_csv, tmp_path_factory) -> Interrupted:
    """A sweep interrupted in its search stage: one search done, one errored, one running."""
    root = tmp_path_factory.mktemp("interrupted")
    (root / "marks").mkdir()
    config = {"model": str(tiny_llama_dir), "task": {"source": str(tiny_csv), "max_length": 32}, **FAST,
              "marks": str(root / "marks")}
    searcher = FlexoraSearcher("val_accuracy", "max", search_seeds=SEARCH_ORDER, neighbours=0)
    interrupt = InterruptSearch(str(root / "marks" / "interrupted"))
    tuner = tune.Tuner(
        fails_once, param_space=config,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=searcher.planned_trials,
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name="sweep", storage_path=str(root), verbose=0, callbacks=[interrupt]),
    )
    ended = {r.config["seed"]: (r.config["stage"], r.error is not None, r.metrics.get("final")) for r in tuner.fit()}
    assert ended == {0: ("search", False, False), 1: ("search", True, None), 2: ("search", False, True)}
    shutil.copytree(root / "sweep", root / "pristine")
    return Interrupted(root / "sweep", root / "pristine", interrupt.staging)


def subset(blocks: str) -> tuple[int, ...]:
    return tuple(int(b) for b in blocks.split(","))


@pytest.mark.parametrize("option, searches_expected", [
    ({"resume_unfinished": False}, [2]),  # search 0 will never finish: recognised, and the sweep goes on
    ({"restart_errored": True}, [0, 1, 2]),  # search 0 resumes, search 1 re-runs under a new id
    ({"resume_errored": True, "resume_unfinished": False}, [1, 2]),  # search 1 re-runs under its old id
])
def test_restored_sweep_ends_with_the_planned_finetunes(interrupted, option, searches_expected):
    interrupted.reset()
    started = time.time()
    grid = tune.Tuner.restore(str(interrupted.path), trainable=fails_once, **option).fit()
    assert time.time() - started < 120  # no 600 s wait on a trial that will not report
    df = grid.get_dataframe()
    searches = df[(df["stage"] == "search") & df["final"]]
    assert sorted(searches["seed"]) == searches_expected
    selections = [subset(b) for b in searches.sort_values("seed", key=lambda s: s.map(SEARCH_ORDER.index))
                  ["blocks"]]
    planned = set(selections) | ({consensus(selections)} if len(selections) > 1 else set())
    finetunes = df[df["stage"] == "finetune"]
    assert sorted(subset(b) for b in finetunes["blocks"]) == sorted(planned)  # each once, nothing else
    assert finetunes["final"].all()
