"""Compute in fine-tune equivalents: FLOPs over one all-blocks fine-tune of the same seed, in the summary, the
printed table, summary.md and the best-so-far plot's axis; the fallback unit when `all` did not run; and the
seconds axis (unchanged) when the trials have no FLOPs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from flexora_tune.report import (
    FT_COLUMNS,
    SUMMARY_COLUMNS,
    best_per_seed,
    best_so_far_axis,
    finetune_equivalents,
    finetune_units,
    format_summary,
    has_flops,
    plot_best_so_far,
    summarize,
    write_report,
    write_trials,
)

UNIT = {0: 100.0, 1: 200.0}  # one all-blocks fine-tune's FLOPs, per seed
# trial_id, strategy, seed, stage, val, flops in units of that seed's all-blocks fine-tune, status
ROWS = [
    ("a0", "all", 0, "finetune", 0.80, 1.0, "TERMINATED"),
    ("a1", "all", 1, "finetune", 0.78, 1.0, "TERMINATED"),
    # flexora seed 0: search 1.5, then 0.5 and 0.6 (the winner): to best 2.6, total 2.6
    ("f0s", "flexora", 0, "search", math.nan, 1.5, "TERMINATED"),
    ("f0a", "flexora", 0, "finetune", 0.80, 0.5, "TERMINATED"),
    ("f0b", "flexora", 0, "finetune", 0.85, 0.6, "TERMINATED"),
    # flexora seed 1: the first fine-tune wins: to best 2.0, total 2.6
    ("f1s", "flexora", 1, "search", math.nan, 1.5, "TERMINATED"),
    ("f1a", "flexora", 1, "finetune", 0.84, 0.5, "TERMINATED"),
    ("f1b", "flexora", 1, "finetune", 0.70, 0.6, "TERMINATED"),
    # random: the first wins; an errored trial's FLOPs count in the total (seed 0: 1.2, seed 1: 1.0)
    ("r0a", "random", 0, "finetune", 0.82, 0.5, "TERMINATED"),
    ("r0b", "random", 0, "finetune", 0.79, 0.5, "TERMINATED"),
    ("r0c", "random", 0, "finetune", math.nan, 0.2, "ERROR"),
    ("r1a", "random", 1, "finetune", 0.81, 0.5, "TERMINATED"),
    ("r1b", "random", 1, "finetune", 0.80, 0.5, "TERMINATED"),
]


def make_trials(seconds_factor: float = 1.0) -> pd.DataFrame:
    df = pd.DataFrame(ROWS, columns=["trial_id", "strategy", "seed", "stage", "val_accuracy", "ft", "status"])
    df["flops"] = df["ft"] * df["seed"].map(UNIT)
    df["test_accuracy"] = df["val_accuracy"] - 0.01
    df["blocks"], df["num_blocks_total"] = "[0, 1, 2, 3]", 4
    rng = np.random.default_rng(0)
    df["compute_s"] = seconds_factor * rng.uniform(1, 10, len(df))  # wall seconds have nothing to do with FLOPs
    df["start_time"] = np.arange(len(df), dtype=float)
    return df.drop(columns="ft")


def test_summary_in_finetune_equivalents_by_hand():
    summary = summarize(make_trials()).set_index("strategy")
    assert list(summary.reset_index().columns) == list(SUMMARY_COLUMNS)
    assert summary.loc["flexora", "compute_to_best_ft"] == pytest.approx((2.6 + 2.0) / 2)
    assert summary.loc["flexora", "total_compute_ft"] == pytest.approx(2.6)
    assert summary.loc["random", "compute_to_best_ft"] == pytest.approx(0.5)
    assert summary.loc["random", "total_compute_ft"] == pytest.approx((1.2 + 1.0) / 2)
    assert summary.loc["all", "compute_to_best_ft"] == pytest.approx(1.0) == summary.loc["all", "total_compute_ft"]
    per_seed = best_per_seed(make_trials()).set_index(["strategy", "seed"])
    assert per_seed.loc[("flexora", 1), "compute_to_best_ft"] == pytest.approx(2.0)
    assert list(per_seed.columns[-len(FT_COLUMNS):]) == list(FT_COLUMNS)


def test_finetune_equivalents_do_not_move_with_wall_seconds():
    quiet, loaded = summarize(make_trials()), summarize(make_trials(seconds_factor=3.0))
    pd.testing.assert_series_equal(quiet["compute_to_best_ft"], loaded["compute_to_best_ft"])
    pd.testing.assert_series_equal(quiet["total_compute_ft"], loaded["total_compute_ft"])
    np.testing.assert_allclose(loaded["compute_to_best_mean"], 3 * quiet["compute_to_best_mean"])  # seconds move


def test_units_come_from_the_all_fine_tune_of_each_seed():
    trials = make_trials()
    units = finetune_units(trials)
    assert list(units["unit_flops"]) == [100.0, 200.0] and list(units["unit_source"]) == ["all", "all"]
    ft = finetune_equivalents(trials)
    assert ft[trials["trial_id"] == "f1s"].item() == pytest.approx(1.5)


def test_without_all_the_largest_fine_tune_is_the_unit_and_the_report_says_so(tmp_path):
    trials = make_trials()
    trials = trials[~((trials["strategy"] == "all") & (trials["seed"] == 1))]
    errored_all = {"trial_id": "a1x", "strategy": "all", "seed": 1, "stage": "finetune", "val_accuracy": math.nan,
                   "flops": 9999.0, "status": "ERROR", "blocks": "[0, 1, 2, 3]", "num_blocks_total": 4,
                   "compute_s": 1.0, "start_time": 99.0, "test_accuracy": math.nan}
    trials = pd.concat([trials, pd.DataFrame([errored_all])], ignore_index=True)  # an errored 'all' is no unit
    units = finetune_units(trials).set_index("seed")
    assert units.loc[1, "unit_source"] == "largest fine-tune" and units.loc[1, "unit_flops"] == pytest.approx(120.0)
    assert units.loc[0, "unit_source"] == "all"
    per_seed = best_per_seed(trials).set_index(["strategy", "seed"])
    assert per_seed.loc[("flexora", 1), "compute_to_best_ft"] == pytest.approx((300 + 100) / 120)
    write_trials(trials, tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"target_modules": ["q_proj"], "layers_pattern": "layers"}))
    with pytest.warns(UserWarning, match=r"no finished 'all' fine-tune for seed\(s\) 1"):
        paths = write_report(tmp_path)
    md = paths["summary_md"].read_text()
    assert "Compute in fine-tune equivalents" in md and "has no finished fine-tune for seed(s) 1" in md


def test_printed_table_and_plot_axis_use_finetune_equivalents(tmp_path):
    trials = make_trials()
    header, _, *rows = format_summary(summarize(trials)).splitlines()
    assert "compute to best (ft)" in header and "total compute (ft)" in header and "compute to best (s)" in header
    flexora = next(r for r in rows if r.startswith("flexora"))
    assert "2.30" in flexora and "2.60" in flexora
    x, label = best_so_far_axis(trials)
    assert "fine-tune equivalents" in label
    assert x[trials["trial_id"] == "f1s"].item() == pytest.approx(1.5)
    assert imread(plot_best_so_far(trials, tmp_path / "ft.png")).std() > 0


def test_without_flops_everything_stays_in_seconds():
    trials = make_trials().drop(columns="flops")
    assert not has_flops(trials) and finetune_equivalents(trials) is None
    summary = summarize(trials)
    assert summary[list(FT_COLUMNS)].isna().all().all()
    assert "(ft)" not in format_summary(summary)
    x, label = best_so_far_axis(trials)
    assert label.startswith("cumulative compute (s)") and list(x) == list(trials["compute_s"])
    trials["flops"] = math.nan  # a flops column without numbers is no flops column
    assert not has_flops(trials) and best_so_far_axis(trials)[1] == label


def test_a_seed_without_a_unit_falls_back_to_seconds_on_the_plot():
    trials = make_trials()
    trials.loc[trials["seed"] == 1, "flops"] = math.nan
    summary = summarize(trials).set_index("strategy")
    assert summary.loc["flexora", "total_compute_ft"] == pytest.approx(2.6)  # seed 0 only
    with pytest.warns(UserWarning, match="uses compute seconds"):
        assert best_so_far_axis(trials)[1].startswith("cumulative compute (s)")
