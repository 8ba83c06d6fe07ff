"""The block-scores figure: Flexora's final alpha and each probe's scores per block, as ranks averaged over seeds,
with each probe's Spearman correlation against Flexora checked by hand; written only when searches or probes
scored the blocks."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from flexora_tune.report import (
    BLOCK_SCORES_FILE,
    block_score_rows,
    block_scores,
    block_values,
    plot_block_scores,
    write_report,
    write_trials,
)

L = 6
NAN = math.nan
# Flexora's alpha ranks per seed: [3, 5, 1, 6, 2, 4] and [4, 5, 1, 6, 2, 3]: mean [3.5, 5, 1, 6, 2, 3.5].
ALPHA = {0: [0.1, 0.5, -0.2, 0.9, 0.0, 0.3], 1: [0.3, 0.5, -0.1, 0.8, 0.0, 0.2]}
# lora-norm ranks [3, 5, 2, 6, 1, 4] on both seeds (another scale each); grad-norm [6, 5, 4, 3, 2, 1].
LORA_NORM = {0: [1.0, 2.0, 0.5, 3.0, 0.2, 1.5], 1: [10.0, 20.0, 5.0, 30.0, 2.0, 15.0]}
GRAD_NORM = {0: [0.6, 0.5, 0.4, 0.3, 0.2, 0.1], 1: [60.0, 50.0, 40.0, 30.0, 20.0, 10.0]}
# Spearman of the mean ranks: Pearson of [3.5, 5, 1, 6, 2, 3.5] with [3, 5, 2, 6, 1, 4] (both mean 3.5):
# deviations [0, 1.5, -2.5, 2.5, -1.5, 0] and [-0.5, 1.5, -1.5, 2.5, -2.5, 0.5]; cross sum 16, squares 17 and 17.5.
RHO_LORA_NORM = 16 / math.sqrt(17 * 17.5)
# ... and with [6, 5, 4, 3, 2, 1]: deviations [2.5, 1.5, 0.5, -0.5, -1.5, -2.5]; cross sum 0 + 2.25 - 1.25 - 1.25
# + 2.25 + 0 = 2.
RHO_GRAD_NORM = 2 / math.sqrt(17 * 17.5)
META = {"metric": "val_accuracy", "reference": "random", "target_modules": ["q_proj"], "layers_pattern": "layers"}


def make_trials(probes: bool = True, searches: bool = True) -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        if searches:
            rows.append(dict(trial_id=f"f{seed}-search", strategy="flexora", seed=seed, stage="search",
                             blocks="[1, 3]", alpha=json.dumps(ALPHA[seed]), start_time=0.0))
        rows.append(dict(trial_id=f"f{seed}-ft", strategy="flexora", seed=seed, stage="finetune", blocks="[1, 3]",
                         val_accuracy=0.8 + 0.01 * seed, test_accuracy=0.7, start_time=10.0))
        if probes:
            # JSON text as in trials.csv for one probe, a list for the other; both must read
            rows.append(dict(trial_id=f"l{seed}-probe", strategy="lora-norm", seed=seed, stage="probe",
                             blocks="[1, 3]", probe_scores=json.dumps(LORA_NORM[seed]), start_time=0.0))
            rows.append(dict(trial_id=f"g{seed}-probe", strategy="grad-norm", seed=seed, stage="probe",
                             blocks="[0, 1]", probe_scores=GRAD_NORM[seed], start_time=0.0))
            # an earlier, errored probe whose scores must not count
            rows.append(dict(trial_id=f"g{seed}-bad", strategy="grad-norm", seed=seed, stage="probe", blocks="",
                             probe_scores=json.dumps([9.0] * L), start_time=-1.0, status="ERROR"))
        rows.append(dict(trial_id=f"r{seed}-ft", strategy="random", seed=seed, stage="finetune", blocks="[0, 5]",
                         val_accuracy=0.75, test_accuracy=0.7, start_time=0.0))
    df = pd.DataFrame(rows)
    df["status"] = df["status"].fillna("TERMINATED") if "status" in df.columns else "TERMINATED"
    df["num_blocks_total"], df["compute_s"] = L, 1.0
    for column in ("alpha", "probe_scores", "val_accuracy", "test_accuracy"):
        if column not in df.columns:
            df[column] = NAN
    return df


def test_block_values_reads_json_text_lists_and_arrays_of_the_right_length():
    assert block_values("[1, 2.5]", 2) == [1.0, 2.5]
    assert block_values((1, 2), 2) == block_values(np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    for bad in ("[1, 2, 3]", "[1, null]", "[1, NaN]", "oops", NAN, None, "", [1, "x"]):
        assert block_values(bad, 2) is None


def test_mean_ranks_and_rank_correlations_by_hand():
    rows = block_score_rows(make_trials())
    assert sorted(rows["trial_id"]) == sorted(f"{p}{s}-{k}" for p, k in (("f", "search"), ("l", "probe"),
                                                                       ("g", "probe")) for s in (0, 1))
    found = block_scores(make_trials())
    assert found is not None and found.num_blocks == L
    assert list(found.ranks.index) == ["flexora", "grad-norm", "lora-norm"]  # the search first
    assert list(found.ranks.loc["flexora"]) == [3.5, 5, 1, 6, 2, 3.5]
    assert list(found.ranks.loc["lora-norm"]) == [3, 5, 2, 6, 1, 4]
    assert list(found.ranks.loc["grad-norm"]) == [6, 5, 4, 3, 2, 1]  # the errored probe left out
    assert found.reference == "flexora" and found.seeds == {"flexora": 2, "grad-norm": 2, "lora-norm": 2}
    assert found.correlations == {"grad-norm": pytest.approx(RHO_GRAD_NORM), "lora-norm": pytest.approx(RHO_LORA_NORM)}
    labels = found.labels()
    assert labels[0] == "flexora: final alpha, 2 seeds"
    assert labels[2] == f"lora-norm: probe scores, 2 seeds\nρ = {RHO_LORA_NORM:+.2f} vs flexora"
    assert "ρ = +0.93" in labels[2] and "ρ = +0.12" in labels[1]


def test_rows_of_another_block_count_are_left_out_with_a_warning():
    trials = make_trials()
    odd = trials["trial_id"] == "l1-probe"
    trials.loc[odd, "num_blocks_total"], trials.loc[odd, "probe_scores"] = 4, json.dumps([1.0, 2.0, 3.0, 4.0])
    with pytest.warns(UserWarning, match=r"\['l1-probe'\] score another number of blocks than 6"):
        found = block_scores(trials)
    assert found.seeds["lora-norm"] == 1 and list(found.ranks.loc["lora-norm"]) == [3, 5, 2, 6, 1, 4]


def test_probes_without_a_search_are_drawn_without_correlations(tmp_path):
    found = block_scores(make_trials(searches=False))
    assert found is not None and found.reference is None and found.correlations == {}
    assert imread(plot_block_scores(make_trials(searches=False), tmp_path / "p.png")).std() > 0


def test_write_report_draws_block_scores_only_with_scored_searches_or_probes(tmp_path):
    with_scores = tmp_path / "with"
    write_trials(make_trials(), with_scores)
    (with_scores / "meta.json").write_text(json.dumps(META))
    paths = write_report(with_scores)
    assert paths["block_scores"] == with_scores / BLOCK_SCORES_FILE
    image = imread(paths["block_scores"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    assert f"![{BLOCK_SCORES_FILE}]" in paths["summary_md"].read_text()

    without = tmp_path / "without"
    write_trials(make_trials(probes=False, searches=False), without)
    (without / "meta.json").write_text(json.dumps(META))
    assert plot_block_scores(make_trials(probes=False, searches=False), without / "x.png") is None
    (without / BLOCK_SCORES_FILE).write_bytes(b"stale")  # from an earlier report of another table
    paths = write_report(without)
    assert "block_scores" not in paths and not (without / BLOCK_SCORES_FILE).exists()
    assert not (without / "x.png").exists()

    unscored = make_trials(probes=False)
    unscored["alpha"] = NAN  # searches that left no alpha score nothing
    assert block_scores(unscored) is None
