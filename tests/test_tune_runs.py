"""Real Ray Tune sweeps on a tiny model: every strategy through tune.run and tune.Tuner, errors, fractional
GPUs, ASHA and metric conflicts (restores: test_tune_restore.py; schedulers: test_tune_schedulers.py). Kept few
and tiny (one shared Ray session)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from flexora_tune import FlexoraSearcher, RandomLayerSearcher, StaticLayerSearcher, tpe_searcher, trainable
from flexora_tune.search import decode_layers

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

FAST = {"max_steps": 4, "eval_every": 2, "batch_size": 8, "steps": 4, "report_every": 2}


@pytest.fixture
def base(tiny_llama_dir, tiny_csv):
    return {"model": str(tiny_llama_dir), "task": {"source": str(tiny_csv), "max_length": 32}, **FAST}


def run(search_alg, config, tmp_path, **kwargs):
    analysis = tune.run(trainable, config=config, search_alg=search_alg, storage_path=str(tmp_path), verbose=0,
                        reuse_actors=True, **kwargs)
    return analysis.dataframe()


def fit(search_alg, config, tmp_path, num_samples, fn=trainable, scheduler=None, **tune_config):
    tuner = tune.Tuner(
        fn, param_space=config,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                    reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    )
    return tuner.fit().get_dataframe()


def subsets(df):
    return [tuple(int(b) for b in s.split(",")) for s in df["blocks"]]


def test_flexora_sweep_verbatim_searches_then_finetunes_the_selection(base, tmp_path):
    searcher = FlexoraSearcher(metric="val_accuracy", mode="max")
    df = run(searcher, base, tmp_path, num_samples=4, max_concurrent_trials=2)
    assert len(df) == 4 and {"strategy", "stage", "blocks", "val_accuracy", "test_accuracy", "compute_s"} <= set(df)
    search = df[df["stage"] == "search"]
    finetunes = df[df["stage"] == "finetune"]
    assert len(search) == 1 and len(finetunes) == 3 and set(df["strategy"]) == {"flexora"}
    assert search["report_time"].max() < finetunes["start_time"].min()  # searches ran before fine-tunes
    selected = subsets(search)[0]
    tuned = dict(zip(finetunes["variant"], subsets(finetunes), strict=True))
    assert tuned["search0"] == selected
    assert {len(b) for v, b in tuned.items() if v != "search0"} <= {len(selected) - 1, len(selected) + 1}
    assert len(set(tuned.values())) == len(tuned)
    assert finetunes["final"].all() and (finetunes["compute_s"] > 0).all()
    assert (df["threads"] == 1).all()


def failing_search(config):
    """The real trainable, except that search seed 1 fails: the sweep must go on without it."""
    if config.get("stage") == "search" and config.get("seed") == 1:
        raise RuntimeError("planned failure")
    trainable(config)


def test_flexora_survives_an_errored_search(base, tmp_path):
    searcher = FlexoraSearcher("val_accuracy", "max", n_searches=2, neighbours=0)
    analysis = tune.run(failing_search, config=base, search_alg=searcher, num_samples=10,
                        max_concurrent_trials=2, storage_path=str(tmp_path), verbose=0, reuse_actors=True,
                        raise_on_failed_trial=False)
    assert [t.config["seed"] for t in analysis.trials if t.status == "ERROR"] == [1]
    df = analysis.dataframe()
    finetunes, search = df[df["stage"] == "finetune"], df[(df["stage"] == "search") & (df["seed"] == 0)]
    assert subsets(finetunes) == subsets(search) and list(finetunes["variant"]) == ["search0"]


@pytest.mark.parametrize("api", ["run", "tuner"])
def test_random_and_tpe_sweeps(base, tmp_path, api):
    for name, searcher in [("random2", RandomLayerSearcher("val_accuracy", "max", k=2, seed=1)),
                           ("tpe", tpe_searcher("val_accuracy", "max", seed=0))]:
        if api == "run":
            df = run(searcher, base, tmp_path / name, num_samples=2, max_concurrent_trials=2)
        else:
            df = fit(searcher, base, tmp_path / name, num_samples=2, max_concurrent_trials=2)
        assert len(df) == 2 and set(df["strategy"]) == {name} and df["val_accuracy"].notna().all()
        layers = [decode_layers({k.split("/")[-1]: v for k, v in row.items() if k.startswith("config/layers/")})
                  for _, row in df.iterrows()]
        assert [s.blocks for s in layers] == subsets(df)
        if name == "random2":
            assert len(set(subsets(df))) == 2 and {len(b) for b in subsets(df)} == {2}


def test_static_rules_through_tuner_and_run(base, tmp_path):
    df = fit(StaticLayerSearcher("val_accuracy", "max", rule="all"), base, tmp_path / "all", num_samples=5)
    assert len(df) == 1 and subsets(df) == [(0, 1, 2, 3)] and list(df["strategy"]) == ["all"]
    df = run(StaticLayerSearcher("val_accuracy", "max", rule="last", k=2, seeds=(0, 1)), base,
             tmp_path / "last", num_samples=5)
    assert subsets(df) == [(2, 3), (2, 3)] and sorted(df["seed"]) == [0, 1] and set(df["strategy"]) == {"last2"}


def waits_for_a_partner(config):
    """Start training only once another trial has started too (or give up after 60 s)."""
    marks = Path(config.pop("marks"))
    (marks / f"{os.getpid()}-{time.time()}").touch()
    deadline = time.time() + 60
    while len(list(marks.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    trainable(config)


def test_two_trials_share_a_logical_gpu(base, tmp_path, ray_session):
    assert ray_session.cluster_resources().get("GPU") == 1
    (tmp_path / "marks").mkdir()
    searcher = StaticLayerSearcher("val_accuracy", "max", rule="list", blocks=[[0], [3]])
    started = time.time()
    analysis = tune.run(tune.with_resources(waits_for_a_partner, {"cpu": 1, "gpu": 0.5}),
                        config={**base, "device": "cpu", "marks": str(tmp_path / "marks")}, search_alg=searcher,
                        num_samples=2,
                        max_concurrent_trials=2, storage_path=str(tmp_path), verbose=0)
    df = analysis.dataframe()
    assert len(df) == 2 and time.time() - started < 60
    (a_start, a_end), (b_start, b_end) = zip(df["start_time"], df["report_time"], strict=True)
    assert a_start < b_end and b_start < a_end  # the two trials overlapped
    assert set(df["device"]) == {"cpu"}  # a logical GPU on a CPU-only machine: run on the CPU


def test_asha_stops_a_bad_subset_early(base, tmp_path):
    # Constructed so the outcome is certain: the metric is the trainable-parameter count (lower is better),
    # so the 4-block subset, run after the 1-block one, falls below ASHA's first-rung cutoff.
    searcher = StaticLayerSearcher("trainable_params", "min", rule="list", blocks=[[0], [0, 1, 2, 3]])
    asha = ASHAScheduler(metric="trainable_params", mode="min", grace_period=1, reduction_factor=2, max_t=10)
    df = fit(searcher, {**base, "max_steps": 6}, tmp_path, num_samples=2, scheduler=asha, max_concurrent_trials=1)
    by_size = {len(b): row for b, (_, row) in zip(subsets(df), df.iterrows(), strict=True)}
    assert by_size[1]["final"] and by_size[1]["training_iteration"] == 3
    assert not by_size[4]["final"] and by_size[4]["training_iteration"] < 3


def test_a_metric_conflict_raises_before_any_trial(base, tmp_path):
    tuner = tune.Tuner(
        trainable, param_space=base,
        tune_config=tune.TuneConfig(search_alg=tpe_searcher("val_loss", "min", num_blocks=4), metric="val_accuracy",
                                    mode="max"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="conflict", verbose=0),
    )
    with pytest.raises(ValueError, match="metric='val_loss' but the TuneConfig has metric='val_accuracy'"):
        tuner.fit()
    assert not [p for p in (tmp_path / "conflict").iterdir() if p.is_dir()]  # no trial started
