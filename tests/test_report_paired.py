"""Paired verdicts: the Student t quantiles they rest on (against published values and arbitrary precision),
and each strategy against a reference on synthetic trials whose answer is known (clearly better, clearly worse,
no difference, too few seeds, a missing reference), in the summary, the printed table and the written files."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from flexora_tune.report import (
    PAIRED_COLUMNS,
    SUMMARY_COLUMNS,
    best_per_seed,
    format_summary,
    mean_confidence_interval,
    paired_verdicts,
    student_t_cdf,
    student_t_quantile,
    summarize,
    write_report,
    write_trials,
)

# Two-sided 95% critical values t_{0.975, df} from the standard tables (df 1..30, then the normal limit).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 60: 2.000, 120: 1.980, math.inf: 1.960}
T_995 = {1: 63.657, 2: 9.925, 3: 5.841, 5: 4.032, 10: 3.169, 30: 2.750, math.inf: 2.576}
T_95 = {1: 6.314, 2: 2.920, 4: 2.132, 10: 1.812, 30: 1.697}


# ---------------------------------------------------------------------------------------------- t distribution


@pytest.mark.parametrize(("p", "table"), [(0.975, T_975), (0.995, T_995), (0.95, T_95)])
def test_t_quantiles_match_the_published_table_to_three_decimals(p, table):
    for df, expected in table.items():
        assert round(student_t_quantile(p, df), 3) == pytest.approx(expected, abs=1e-9), df
        assert student_t_quantile(1 - p, df) == pytest.approx(-student_t_quantile(p, df), rel=1e-12)


def test_t_cdf_inverts_the_quantile_and_has_known_values():
    assert student_t_cdf(0.0, 3) == 0.5 and student_t_quantile(0.5, 7) == 0.0
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-14)  # Cauchy: 1/2 + atan(1)/pi
    assert student_t_cdf(2.0, 2) == pytest.approx(0.5 + 1 / math.sqrt(6), abs=1e-14)  # 1/2 + t / (2 sqrt(2 + t^2))
    assert student_t_cdf(1.5, 1e9) == pytest.approx(statistics.NormalDist().cdf(1.5), abs=1e-9)
    for df in (1, 2, 3, 4.5, 7, 29, 500):
        for p in (1e-6, 0.01, 0.3, 0.6, 0.975, 0.999999):
            assert student_t_cdf(student_t_quantile(p, df), df) == pytest.approx(p, rel=1e-9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        student_t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="positive"):
        student_t_cdf(1.0, 0)


def test_t_cdf_agrees_with_arbitrary_precision():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for df in (1, 2, 3, 5, 9, 30, 1000):
        for t in (-6.0, -2.5, -0.3, 0.7, 2.0, 12.0):
            x = mpmath.mpf(df) / (df + mpmath.mpf(t) ** 2)
            tail = mpmath.betainc(mpmath.mpf(df) / 2, mpmath.mpf(1) / 2, 0, x, regularized=True) / 2
            exact = 1 - tail if t > 0 else tail
            assert student_t_cdf(t, df) == pytest.approx(float(exact), rel=1e-11, abs=1e-15), (df, t)


def test_mean_confidence_interval_by_hand():
    values = [0.01, 0.03, 0.02, 0.06]
    mean, low, high, n = mean_confidence_interval(values)
    half = 3.182446305284263 * np.std(values, ddof=1) / 2  # t_{0.975, 3} * s / sqrt(4)
    assert (mean, n) == (pytest.approx(0.03), 4)
    assert (low, high) == (pytest.approx(0.03 - half, rel=1e-10), pytest.approx(0.03 + half, rel=1e-10))
    assert mean_confidence_interval([0.2, math.nan, 0.2, 0.2])[1:] == (pytest.approx(0.2), pytest.approx(0.2), 3)
    one = mean_confidence_interval([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2]) and one[3] == 1
    assert math.isnan(mean_confidence_interval([])[0])


# ---------------------------------------------------------------------------------------------- synthetic trials

# Per-seed validation and test of the reference ("all"); the seeds differ a lot, as real seeds do.
BASE_VAL = [0.70, 0.80, 0.75, 0.85, 0.78]
BASE_TEST = [0.68, 0.79, 0.72, 0.83, 0.80]
NOISE = [0.004, -0.003, 0.002, -0.004, 0.001]
# strategy -> per-seed offset from the reference: clearly better, clearly worse, no difference (mean 0).
OFFSETS = {"all": [0.0] * 5, "good": [0.05 + e for e in NOISE], "bad": [-0.06 + e for e in NOISE],
           "same": [0.02, -0.02, 0.01, -0.01, 0.0]}


def make_trials(offsets=OFFSETS, seeds=5, test=True) -> pd.DataFrame:
    """One fine-tune per strategy and seed (plus, for "good", a worse-val trial with a far better test that must
    not be paired)."""
    rows = []
    for strategy, offset in offsets.items():
        for seed in range(seeds):
            rows.append((f"{strategy}-{seed}", strategy, seed, BASE_VAL[seed] + offset[seed],
                         BASE_TEST[seed] + offset[seed]))
            if strategy == "good":
                rows.append((f"{strategy}-{seed}-decoy", strategy, seed, 0.1, 0.99))
    df = pd.DataFrame(rows, columns=["trial_id", "strategy", "seed", "val_accuracy", "test_accuracy"])
    if not test:
        df = df.drop(columns="test_accuracy")
    df["stage"], df["blocks"], df["num_blocks_total"], df["status"] = "finetune", "[0, 1]", 4, "TERMINATED"
    df["compute_s"], df["start_time"] = 1.0, np.arange(len(df), dtype=float)
    return df


def results_dir(folder, trials, **meta):
    write_trials(trials, folder)
    (folder / "meta.json").write_text(json.dumps({"metric": "val_accuracy", "target_modules": ["q_proj"],
                                                  "layers_pattern": "layers", **meta}))
    return folder


def test_paired_verdicts_on_known_answers():
    summary = summarize(make_trials()).set_index("strategy")
    assert list(summary.reset_index().columns) == list(SUMMARY_COLUMNS)
    assert summary.loc["good", "val_verdict"] == "better" and summary.loc["good", "test_verdict"] == "better"
    assert summary.loc["bad", "val_verdict"] == "worse" and summary.loc["bad", "test_verdict"] == "worse"
    assert summary.loc["same", "val_verdict"] == "no difference" == summary.loc["same", "test_verdict"]
    assert summary.loc["all", "val_verdict"] == "reference" and pd.isna(summary.loc["all", "val_diff_mean"])
    assert (summary["reference"] == "all").all()
    assert list(summary.loc[["good", "bad", "same"], "n_pairs"]) == [5, 5, 5]

    good = OFFSETS["good"]
    half = T_975[4] * np.std(good, ddof=1) / math.sqrt(5)
    assert summary.loc["good", "val_diff_mean"] == pytest.approx(np.mean(good))
    assert summary.loc["good", "val_diff_lo"] == pytest.approx(np.mean(good) - half, abs=2e-6)
    assert summary.loc["good", "val_diff_hi"] == pytest.approx(np.mean(good) + half, abs=2e-6)
    # the chosen trial's test is paired (the decoy's 0.99 test never is)
    assert summary.loc["good", "test_diff_mean"] == pytest.approx(np.mean(good))
    same = summary.loc["same"]
    assert same["val_diff_mean"] == pytest.approx(0.0, abs=1e-12) and same["val_diff_lo"] < 0 < same["val_diff_hi"]


def test_verdicts_follow_the_metrics_direction():
    trials = make_trials()
    trials["val_loss"], trials["test_loss"] = 1 - trials["val_accuracy"], 1 - trials["test_accuracy"]
    summary = summarize(trials, "val_loss").set_index("strategy")
    assert summary.loc["good", "val_diff_mean"] < 0  # a lower loss ...
    assert summary.loc["good", "val_verdict"] == "better" == summary.loc["good", "test_verdict"]  # ... is better
    assert summary.loc["bad", "val_verdict"] == "worse" == summary.loc["bad", "test_verdict"]


def test_another_reference_and_seeds_are_paired_by_seed_not_by_order():
    trials = make_trials()
    trials = trials[~((trials["strategy"] == "bad") & (trials["seed"] == 1))].iloc[::-1]  # bad lacks seed 1
    summary = summarize(trials, reference="good").set_index("strategy")
    assert summary.loc["good", "val_verdict"] == "reference" and (summary["reference"] == "good").all()
    assert summary.loc["all", "val_verdict"] == "worse" and summary.loc["bad", "n_pairs"] == 4
    expected = [OFFSETS["bad"][s] - OFFSETS["good"][s] for s in (0, 2, 3, 4)]
    assert summary.loc["bad", "val_diff_mean"] == pytest.approx(np.mean(expected))


@pytest.mark.parametrize("seeds", [1, 2])
def test_too_few_seeds_say_so(seeds):
    summary = summarize(make_trials(seeds=seeds)).set_index("strategy")
    good = summary.loc["good"]
    assert good["val_verdict"] == f"too few seeds (n={seeds})" == good["test_verdict"]
    assert good["n_pairs"] == seeds and good["val_diff_mean"] == pytest.approx(np.mean(OFFSETS["good"][:seeds]))
    if seeds == 1:
        assert math.isnan(good["val_diff_lo"]) and math.isnan(good["val_diff_hi"])
    else:  # an interval with one degree of freedom: wide, and shown, but no verdict
        assert good["val_diff_lo"] < good["val_diff_mean"] < good["val_diff_hi"]
    text = format_summary(summarize(make_trials(seeds=seeds)))
    assert f"too few seeds (n={seeds})" in text
    assert ("[" in text.splitlines()[2]) == (seeds == 2)


def test_missing_reference_is_said_not_raised(tmp_path):
    summary = summarize(make_trials(), reference="flexora")
    assert (summary["val_verdict"] == "no reference ('flexora' not run)").all()
    assert (summary["n_pairs"] == 0).all() and summary["val_diff_mean"].isna().all()
    text = format_summary(summary)
    assert "Δ" not in text
    assert text.splitlines()[-1] == "(no paired verdicts: the reference strategy 'flexora' was not run)"
    with pytest.warns(UserWarning, match="reference strategy 'flexora' is not in the trials table"):
        paths = write_report(results_dir(tmp_path, make_trials()), reference="flexora")
    assert "the reference strategy `flexora` was not run" in paths["summary_md"].read_text()


def test_no_common_seed_or_no_test_values():
    trials = make_trials()
    trials.loc[trials["strategy"] == "all", "status"] = "ERROR"  # the reference ran but chose nothing
    assert (summarize(trials).set_index("strategy").drop("all")["val_verdict"] == "no paired seeds").all()
    summary = summarize(make_trials(test=False)).set_index("strategy")
    assert summary.loc["good", "val_verdict"] == "better" and summary.loc["good", "test_verdict"] == "no test values"


def test_paired_verdicts_from_best_per_seed_directly():
    table = paired_verdicts(best_per_seed(make_trials()), "max", reference="same")
    assert list(table.columns) == ["strategy", *PAIRED_COLUMNS]
    assert table.set_index("strategy").loc["good", "val_verdict"] == "better"


def test_printed_table_and_files_carry_the_verdicts(tmp_path):
    text = format_summary(summarize(make_trials()))
    header, _, *rows = text.splitlines()
    assert "Δ test_accuracy vs all" in header and "Δ val_accuracy vs all" in header
    good = next(r for r in rows if r.startswith("good"))
    s = summarize(make_trials()).set_index("strategy").loc["good"]
    assert f"{s['val_diff_mean']:+.3f} [{s['val_diff_lo']:+.3f}, {s['val_diff_hi']:+.3f}] better" in good
    assert next(r for r in rows if r.startswith("all")).endswith("reference")
    assert "no difference" in next(r for r in rows if r.startswith("same"))

    paths = write_report(results_dir(tmp_path, make_trials(), reference="same"))  # the reference from meta.json
    csv = pd.read_csv(paths["summary_csv"])
    assert list(csv.columns) == list(SUMMARY_COLUMNS) and (csv["reference"] == "same").all()
    assert list(csv.columns[-len(PAIRED_COLUMNS):]) == list(PAIRED_COLUMNS)
    assert csv.set_index("strategy").loc["good", "val_verdict"] == "better"
    md = paths["summary_md"].read_text()
    assert "| Δ val_accuracy vs same |" in md and "Student t interval over seeds" in md
    assert format_summary(csv) == format_summary(summarize(make_trials(), reference="same"))  # what the CLI prints
    assert (pd.read_csv(write_report(tmp_path, reference="all")["summary_csv"])["reference"] == "all").all()


def test_write_report_takes_the_mode_from_meta(tmp_path):
    trials = make_trials()
    trials = trials[~trials["trial_id"].str.endswith("decoy")]  # one trial per seed: the mode only flips the sign
    trials["val_score"], trials["test_score"] = 1 - trials["val_accuracy"], 1 - trials["test_accuracy"]
    folder = results_dir(tmp_path, trials, metric="val_score", mode="min")  # a name infer_mode reads as "max"
    csv = pd.read_csv(write_report(folder)["summary_csv"]).set_index("strategy")
    assert csv.loc["good", "val_verdict"] == "better" == csv.loc["good", "test_verdict"]
    assert csv.index[0] == "good"  # the winner by the metric's direction, too
    csv = pd.read_csv(write_report(folder, mode="max")["summary_csv"]).set_index("strategy")
    assert csv.loc["good", "val_verdict"] == "worse"
