"""`compare` as one workload on the tiny model (the shared Ray session): every strategy gets exactly its planned
trials per seed in one Tune experiment, ``--metric val_loss --mode min`` picks the lowest loss end to end, and
``--budget`` (fine-tune equivalents of FLOPs) stops each arm where its compute reaches it."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from flexora_tune.cli import main
from flexora_tune.compare import STRATEGIES, compare
from flexora_tune.search.arms import planned_arm_trials, planned_finetunes

FAST = {"max_steps": 4, "lr": 1e-2, "search": {"steps": 4}}
TRIALS = 2


def subset(blocks: str) -> tuple[int, ...]:
    return tuple(int(b) for b in str(blocks).split(","))


@pytest.fixture(scope="module")
def every_strategy(ray_session, tiny_llama_dir, tiny_csv, tmp_path_factory):
    """Every strategy, 2 seeds, --trials 2, ranked by validation loss."""
    out = tmp_path_factory.mktemp("arms")
    compare(out=out, model=str(tiny_llama_dir), task={"source": str(tiny_csv), "max_length": 32},
            strategies=STRATEGIES, seeds=2, trials=TRIALS, metric="val_loss", mode="min", settings=FAST)
    return out, pd.read_csv(out / "trials.csv")


@pytest.mark.ray
def test_every_strategy_gets_exactly_its_planned_trials_per_seed(every_strategy):
    out, trials = every_strategy
    assert [p.name for p in (out / "ray").iterdir() if p.is_dir()] == ["comparison"]
    assert trials.trial_id.is_unique and (trials.status == "TERMINATED").all()
    for (strategy, seed), rows in trials.groupby(["strategy", "seed"]):
        finetunes = rows[rows.stage == "finetune"]
        assert len(rows) == planned_arm_trials(strategy, TRIALS), (strategy, seed)
        assert len(finetunes) == planned_finetunes(strategy, TRIALS), (strategy, seed)
        assert finetunes.blocks.nunique() == len(finetunes)  # never the same subset twice in an arm
        assert (rows.arm == f"{strategy}_seed{seed}").all()
    assert sorted(trials.strategy.unique()) == sorted(STRATEGIES) and sorted(trials.seed.unique()) == [0, 1]
    for seed in (0, 1):
        rows = trials[trials.seed == seed]
        k = len(subset(rows[rows.stage == "search"].blocks.iloc[0]))
        for strategy in ("random", "tpe", "first-k", "last-k", "lora-norm", "grad-norm"):
            first = rows[(rows.strategy == strategy) & (rows.stage != "search")].blocks.iloc[0]
            assert len(subset(first)) == k, (strategy, seed)  # sized by that seed's Flexora selection
    probes = trials[trials.stage == "probe"]
    assert sorted(probes.strategy) == ["grad-norm", "grad-norm", "lora-norm", "lora-norm"]
    assert all(len(json.loads(s)) == 4 for s in probes.probe_scores)
    assert all(sorted(json.loads(r)) == [0, 1, 2, 3] for r in probes.probe_ranking)
    measured = trials.stage == "finetune"
    assert trials[~measured][["val_loss", "val_accuracy", "test_accuracy"]].isna().all().all()
    assert trials[measured].val_loss.notna().all() and (trials.flops > 0).all()


@pytest.mark.ray
def test_metric_val_loss_mode_min_ranks_and_exports_by_lowest_loss(every_strategy):
    out, trials = every_strategy
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["metric"], meta["mode"]) == ("val_loss", "min")
    best = json.loads((out / "best_selection.json").read_text())
    assert best["val_loss"] == pytest.approx(trials[trials.stage == "finetune"].val_loss.min())
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    finetunes = trials[trials.stage == "finetune"]
    lowest = finetunes.groupby(["strategy", "seed"]).val_loss.min().groupby("strategy").mean()
    for strategy in STRATEGIES:  # each strategy's best is its lowest loss per seed
        assert summary.loc[strategy, "best_val_mean"] == pytest.approx(lowest[strategy]), strategy


@pytest.mark.ray
def test_budget_in_finetune_equivalents_stops_each_arm_where_it_is_reached(ray_session, tiny_llama_dir, tiny_csv,
                                                                            tmp_path, capsys):
    """--budget 0.5: the all-blocks arm stops half-way through its fine-tune, and the random arm (3 planned) stops
    its first trial at half a fine-tune's FLOPs and starts no other (one trial at a time, so nothing overlaps)."""
    from flexora_tune.finetune import finetune_flops

    task = {"source": str(tiny_csv), "max_length": 32}
    settings = {"max_steps": 6, "eval_every": 1, "lr": 1e-2}
    out = tmp_path / "out"
    compare(out=out, model=str(tiny_llama_dir), task=task, strategies=("all", "random"), trials=3, budget=0.5,
            max_concurrent=1, settings=settings)
    unit = finetune_flops(str(tiny_llama_dir), task, None, 0, **settings)
    assert f"budget: 0.5 fine-tune equivalents = {0.5 * unit:.3g} FLOPs" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["budget"] == 0.5
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(trials.strategy) == ["all", "random"]  # random's 2nd and 3rd subsets never start
    assert (trials.status == "EARLY_STOPPED").all() and (trials.steps < 6).all()
    for flops in trials.flops:  # stopped at the first report that reached the budget
        assert 0.5 * unit <= flops < 0.5 * unit + unit / 3


def test_budget_is_checked_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--budget", "0", "--out", str(tmp_path / "c")])
    assert "argument --budget: must be a finite number > 0, got 0" in capsys.readouterr().err
    for bad in (0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="budget must be a positive number of fine-tune equivalents"):
            compare(out=tmp_path / "c", budget=bad)
    assert not (tmp_path / "c").exists()


def test_searches_is_checked_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--searches", "0", "--out", str(tmp_path / "c")])
    assert "--searches" in capsys.readouterr().err
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="searches must be a positive int"):
            compare(out=tmp_path / "c", searches=bad)
    assert not (tmp_path / "c").exists()
