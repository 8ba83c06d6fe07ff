"""The comparison report: per-strategy summary numbers (checked by hand), the never-by-test selection rule,
compute-to-best arithmetic, the written files and plots, reproducibility from trials.csv, and error messages."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from flexora_tune.blocks import BlockSelection, parse_blocks
from flexora_tune.report import (
    REQUIRED_COLUMNS,
    SUMMARY_COLUMNS,
    NoSuccessfulTrialError,
    best_per_seed,
    best_selection,
    format_summary,
    gates_from_alpha,
    plot_best_so_far,
    plot_block_map,
    plot_gate_heatmap,
    read_trials,
    summarize,
    write_report,
    write_trials,
)

L = 6
NAN = math.nan
# trial_id, strategy, seed, stage, blocks, val, test, compute_s, start_time, status
ROWS = [
    # flexora seed 0: a search, then two fine-tunes; the second wins (0.85).
    ("f0-search", "flexora", 0, "search", "[0, 2, 4]", NAN, NAN, 10.0, 0.0, "TERMINATED"),
    ("f0-ft1", "flexora", 0, "finetune", "[0, 2, 4]", 0.80, 0.70, 5.0, 10.0, "TERMINATED"),
    ("f0-ft2", "flexora", 0, "finetune", "[1, 2]", 0.85, 0.75, 5.0, 15.0, "TERMINATED"),
    # flexora seed 1: an errored search (no blocks), a search, a winning fine-tune, then a worse one.
    ("f1-search", "flexora", 1, "search", NAN, NAN, NAN, 3.0, 0.0, "ERROR"),
    ("f1-search2", "flexora", 1, "search", "[3, 5]", NAN, NAN, 8.0, 3.0, "TERMINATED"),
    ("f1-ft1", "flexora", 1, "finetune", "[3, 5]", 0.83, 0.77, 4.0, 11.0, "TERMINATED"),
    ("f1-ft2", "flexora", 1, "finetune", "[3]", 0.60, 0.50, 6.0, 15.0, "TERMINATED"),
    # random seed 0: r0-a has the best *test* of the strategy but a lower val; an errored trial last.
    ("r0-a", "random", 0, "finetune", "[0, 1, 2]", 0.78, 0.90, 4.0, 0.0, "TERMINATED"),
    ("r0-b", "random", 0, "finetune", "[4, 5]", 0.82, 0.71, 4.0, 4.0, "TERMINATED"),
    ("r0-c", "random", 0, "finetune", "[1]", NAN, NAN, 2.0, 8.0, "ERROR"),
    # random seed 1: one result, then an early-stopped trial that never reported val.
    ("r1-a", "random", 1, "finetune", "[2, 3]", 0.79, 0.74, 4.0, 0.0, "TERMINATED"),
    ("r1-b", "random", 1, "finetune", "[0]", NAN, NAN, 1.0, 4.0, "EARLY_STOPPED"),
    # tpe seed 0: rows out of start order (t0-b ran second).
    ("t0-b", "tpe", 0, "finetune", "[5]", 0.70, 0.60, 3.0, 5.0, "TERMINATED"),
    ("t0-a", "tpe", 0, "finetune", "[0, 5]", 0.81, 0.72, 6.0, 0.0, "TERMINATED"),
    # tpe seed 1: t1-a ties f0-ft2 on val (0.85) but cost more; t1-b has the highest test of all (0.99).
    ("t1-a", "tpe", 1, "finetune", "[0, 1, 2, 3]", 0.85, 0.80, 7.0, 0.0, "TERMINATED"),
    ("t1-b", "tpe", 1, "finetune", "[1, 4]", 0.84, 0.99, 2.0, 7.0, "TERMINATED"),
    # all: one seed, errored; it must still appear in the summary.
    ("a0", "all", 0, "finetune", "[0, 1, 2, 3, 4, 5]", NAN, NAN, 1.0, 0.0, "ERROR"),
]


def make_trials() -> pd.DataFrame:
    columns = ["trial_id", "strategy", "seed", "stage", "blocks", "val_accuracy", "test_accuracy", "compute_s",
               "start_time", "status"]
    df = pd.DataFrame(ROWS, columns=columns)
    blocks = df["blocks"].map(parse_blocks)
    df["num_blocks"] = blocks.map(lambda b: len(b) if b else 0)
    df["num_blocks_total"] = L
    df["trainable_params"] = df["num_blocks"] * 1024
    df["train_loss"] = np.where(df["val_accuracy"].notna(), 0.5, NAN)
    df["node"] = "node-0"
    df["end_time"] = df["start_time"] + df["compute_s"]
    df["alpha"] = [json.dumps([0.1 * i for i in range(L)]) if s == "search" and st != "ERROR" else NAN
                   for s, st in zip(df["stage"], df["status"], strict=True)]
    return df


def make_trajectories() -> dict:
    steps = [0, 10, 20, 30, 40]
    return {
        "f0-search": {"strategy": "flexora", "seed": 0, "steps": steps,
                      "alpha": [[0.3 * k * (1 if b % 2 == 0 else -1) for b in range(L)] for k in range(5)]},
        "f1-search2": {"strategy": "flexora", "seed": 1, "steps": steps,
                       "alpha": [[0.1 * k * b for b in range(L)] for k in range(5)]},
    }


META = {"model": "tiny-llama", "task": "keywords", "metric": "val_accuracy", "target_modules": ["q_proj", "v_proj"],
        "layers_pattern": "layers", "command": "flexora-tune compare --strategies flexora,random,tpe,all"}


def results_dir(tmp_path, meta=META, trajectories=True):
    write_trials(make_trials(), tmp_path)
    if meta is not None:
        (tmp_path / "meta.json").write_text(json.dumps(meta))
    if trajectories:
        (tmp_path / "search_trajectories.json").write_text(json.dumps(make_trajectories()))
    return tmp_path


# ---------------------------------------------------------------------------------------------- numbers


def test_summarize_numbers_by_hand():
    summary = summarize(make_trials()).set_index("strategy")
    assert list(summary.reset_index().columns) == list(SUMMARY_COLUMNS)
    flexora = summary.loc["flexora"]
    assert flexora["best_val_mean"] == pytest.approx(0.84)
    assert flexora["best_val_std"] == pytest.approx(np.std([0.85, 0.83], ddof=1))
    assert flexora["test_of_best_mean"] == pytest.approx(0.76)
    assert flexora["compute_to_best_mean"] == pytest.approx((20 + 15) / 2)  # search trials included
    assert flexora["total_compute_mean"] == pytest.approx((20 + 21) / 2)
    assert (flexora["n_seeds"], flexora["n_seeds_ok"], flexora["n_trials"], flexora["n_errors"]) == (2, 2, 7, 1)
    assert flexora["blocks_of_best"] == "1,2" and flexora["num_blocks_of_best"] == 2
    assert flexora["best_trial_id"] == "f0-ft2"

    random = summary.loc["random"]
    assert random["best_val_mean"] == pytest.approx((0.82 + 0.79) / 2)
    # the test of the best-val trials (0.71, 0.74), not the best test of the strategy (0.90)
    assert random["test_of_best_mean"] == pytest.approx((0.71 + 0.74) / 2)
    assert random["compute_to_best_mean"] == pytest.approx((8 + 4) / 2)
    assert random["total_compute_mean"] == pytest.approx((10 + 5) / 2)
    assert (random["n_trials"], random["n_errors"]) == (5, 1)

    tpe = summary.loc["tpe"]
    assert tpe["best_val_mean"] == pytest.approx(0.83)
    assert tpe["test_of_best_mean"] == pytest.approx((0.72 + 0.80) / 2)  # not 0.99
    assert tpe["compute_to_best_mean"] == pytest.approx((6 + 7) / 2)  # start order, not row order: 6, not 9
    assert tpe["blocks_of_best"] == "0,1,2,3"

    failed = summary.loc["all"]
    assert math.isnan(failed["best_val_mean"]) and math.isnan(failed["test_of_best_mean"])
    assert (failed["n_seeds"], failed["n_seeds_ok"], failed["n_errors"], failed["total_compute_mean"]) == (1, 0, 1, 1.0)
    assert pd.isna(failed["blocks_of_best"]) and pd.isna(failed["num_blocks_of_best"])
    # best first, failures last
    assert list(summary.index) == ["flexora", "tpe", "random", "all"]


def test_compute_to_best_counts_every_trial_up_to_the_best_in_start_order():
    per_seed = best_per_seed(make_trials()).set_index(["strategy", "seed"])
    assert per_seed.loc[("flexora", 1), "compute_to_best"] == pytest.approx(3 + 8 + 4)  # errored search counts
    assert per_seed.loc[("flexora", 1), "total_compute"] == pytest.approx(3 + 8 + 4 + 6)
    assert per_seed.loc[("random", 0), "compute_to_best"] == pytest.approx(4 + 4)  # the later error is excluded
    assert per_seed.loc[("random", 0), "total_compute"] == pytest.approx(4 + 4 + 2)
    assert per_seed.loc[("tpe", 0), "compute_to_best"] == pytest.approx(6)
    assert per_seed.loc[("tpe", 0), "best_trial_id"] == "t0-a"


def test_test_metric_never_decides_the_winner():
    trials = make_trials()
    selection, row = best_selection(trials)
    # f0-ft2 and t1-a tie at 0.85 val; f0-ft2 cost less. t1-b (test 0.99) and r0-a (test 0.90) never win.
    assert row["trial_id"] == "f0-ft2"
    assert selection == BlockSelection([1, 2], L)
    two = pd.DataFrame({
        "trial_id": ["hi-test", "hi-val"], "strategy": ["random", "random"], "seed": [0, 0],
        "stage": ["finetune", "finetune"], "blocks": ["[0]", "[1]"], "num_blocks_total": [2, 2],
        "compute_s": [1.0, 1.0], "start_time": [0.0, 1.0], "status": ["TERMINATED", "TERMINATED"],
        "val_accuracy": [0.5, 0.6], "test_accuracy": [0.99, 0.1],
    })
    assert best_selection(two)[1]["trial_id"] == "hi-val"
    assert summarize(two).loc[0, "test_of_best_mean"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="never used to choose"):
        summarize(two, metric="test_accuracy")


def test_errored_trials_never_win_and_a_loss_metric_is_minimised():
    trials = make_trials()
    trials.loc[trials["trial_id"] == "r0-c", "val_accuracy"] = 1.0  # an ERROR row that somehow has a value
    assert best_selection(trials)[1]["trial_id"] == "f0-ft2"
    trials["val_loss"] = 1.0 - trials["val_accuracy"]
    trials.loc[trials["trial_id"] == "r1-a", "val_loss"] = 0.01
    assert best_selection(trials, "val_loss")[1]["trial_id"] == "r1-a"
    assert summarize(trials, "val_loss").loc[0, "strategy"] == "random"


def test_best_selection_raises_when_nothing_succeeded():
    trials = make_trials()
    trials["status"] = "ERROR"
    with pytest.raises(NoSuccessfulTrialError, match="no fine-tune trial finished"):
        best_selection(trials)
    assert summarize(trials)["best_val_mean"].isna().all()


def test_parse_blocks_accepts_json_and_comma_forms():
    assert parse_blocks("[0, 3, 5]") == (0, 3, 5)
    assert parse_blocks("5,0,3") == (0, 3, 5)
    assert parse_blocks([2, 1]) == (1, 2)
    assert parse_blocks(NAN) is None and parse_blocks("") is None and parse_blocks("[]") is None


def test_gates_are_l_times_softmax_and_uniform_alpha_gives_one():
    assert gates_from_alpha([0.0] * 4) == pytest.approx([1.0] * 4)
    g = gates_from_alpha([[1.0, 2.0, 3.0]])
    assert g.sum() == pytest.approx(3.0) and g[0, 2] > g[0, 1] > g[0, 0]


def test_format_summary_is_a_readable_table():
    text = format_summary(summarize(make_trials()))
    lines = text.splitlines()
    assert lines[0].startswith("strategy") and "best val_accuracy" in lines[0]
    assert "0.840 ± 0.014" in text  # flexora: mean ± std over seeds
    assert "0/1" in lines[-1] and lines[-1].startswith("all")  # the failed strategy is visible


# ---------------------------------------------------------------------------------------------- files


def test_write_report_writes_every_artifact(tmp_path):
    paths = write_report(results_dir(tmp_path))
    expected = {"summary_csv", "summary_md", "best_so_far", "gates_heatmap", "block_map", "block_scores",
                "best_selection", "best_lora_config"}
    assert set(paths) == expected
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())

    summary = pd.read_csv(paths["summary_csv"])
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert list(summary["strategy"]) == ["flexora", "tpe", "random", "all"]

    md = paths["summary_md"].read_text()
    assert "| strategy |" in md and "0.840 ± 0.014" in md and "tiny-llama" in md and "![best_so_far.png]" in md

    for key in ("best_so_far", "gates_heatmap", "block_map", "block_scores"):
        image = imread(paths[key])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not blank

    best = json.loads(paths["best_selection"].read_text())
    assert BlockSelection.from_json(json.dumps(best)) == BlockSelection([1, 2], L)
    assert (best["strategy"], best["seed"], best["trial_id"]) == ("flexora", 0, "f0-ft2")
    assert best["val_accuracy"] == pytest.approx(0.85) and best["test_accuracy"] == pytest.approx(0.75)

    config = json.loads(paths["best_lora_config"].read_text())
    assert config["layers_to_transform"] == [1, 2]
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["layers_pattern"] == "layers"


def test_write_report_from_trials_csv_alone_reproduces_summary(tmp_path):
    first = tmp_path / "first"
    paths = write_report(results_dir(first))
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(first / "trials.csv", again / "trials.csv")
    with pytest.warns(UserWarning, match="target_modules"):  # no meta.json: defaults, said out loud
        paths_again = write_report(again)
    assert paths_again["summary_csv"].read_bytes() == paths["summary_csv"].read_bytes()
    assert "gates_heatmap" not in paths_again  # no trajectories, no heatmap
    config = json.loads(paths_again["best_lora_config"].read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["layers_pattern"] == "layers"
    # the CSV round trip matches the in-memory summary
    in_memory = summarize(make_trials())
    pd.testing.assert_frame_equal(pd.read_csv(paths["summary_csv"]), in_memory, check_dtype=False)


def test_write_trials_writes_csv_and_parquet_that_read_back(tmp_path):
    trials = make_trials()
    trials["blocks"] = trials["blocks"].map(lambda b: list(parse_blocks(b)) if parse_blocks(b) else NAN)  # lists
    paths = write_trials(trials, tmp_path)
    assert paths["trials_csv"].is_file()
    read = read_trials(tmp_path)
    assert read.loc[read["trial_id"] == "f0-ft2", "blocks"].item() == "[1, 2]"
    pd.testing.assert_frame_equal(summarize(read), summarize(make_trials()))
    pytest.importorskip("pyarrow")
    parquet = pd.read_parquet(paths["trials_parquet"])
    assert list(parquet.columns) == list(trials.columns) and len(parquet) == len(trials)


def test_plots_can_be_drawn_directly(tmp_path):
    trials = make_trials()
    for path in (plot_best_so_far(trials, tmp_path / "a.png"), plot_block_map(trials, tmp_path / "b.png"),
                 plot_gate_heatmap(make_trajectories(), tmp_path / "c.png")):
        assert imread(path).shape[0] > 0
    with pytest.warns(UserWarning) as caught:
        assert plot_gate_heatmap({"x": {"steps": [0], "alpha": "broken"}}, tmp_path / "d.png") is None
    messages = [str(w.message) for w in caught]
    assert messages[0].startswith("search trajectory 'x' skipped") and "no usable search trajectory" in messages[1]


# ---------------------------------------------------------------------------------------------- errors


def test_missing_trials_csv_names_the_path_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        write_report(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "trials.csv") in message and "flexora-tune compare" in message


def test_missing_columns_are_listed(tmp_path):
    trials = make_trials().drop(columns=["compute_s", "stage"])
    with pytest.raises(ValueError, match=r"missing required columns \['stage', 'compute_s'\]"):
        summarize(trials)
    write_trials(trials, tmp_path)
    with pytest.raises(ValueError, match="compute_s"):
        write_report(tmp_path)
    assert "compute_s" in REQUIRED_COLUMNS


def test_unknown_metric_lists_the_available_metric_columns():
    with pytest.raises(ValueError, match=r"'val_f1'.*available metric columns: \['val_accuracy'\]"):
        summarize(make_trials(), metric="val_f1")


def test_block_map_still_draws_when_every_trial_failed(tmp_path):
    trials = make_trials()
    trials["status"], trials["val_accuracy"], trials["num_blocks_total"] = "ERROR", NAN, NAN
    assert plot_block_map(trials, tmp_path / "block_map.png").stat().st_size > 0


def _folder_state(folder) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_non_validation_metric_is_refused_before_anything_is_written(tmp_path):
    out = results_dir(tmp_path)
    write_report(out)
    trials = make_trials()
    trials["val_loss"] = 1.0 - trials["val_accuracy"]
    write_trials(trials, out)
    (out / "meta.json").write_text(json.dumps({**META, "metric": "train_loss"}))  # a bad default as well
    before = _folder_state(out)
    for choose in (lambda: write_report(out, metric="train_loss"), lambda: write_report(out),
                   lambda: summarize(trials, metric="train_loss"), lambda: best_selection(trials, "train_loss")):
        with pytest.raises(ValueError) as info:
            choose()
        message = str(info.value)
        assert "'train_loss' is not a validation metric" in message
        assert "['val_accuracy', 'val_loss']" in message
    assert _folder_state(out) == before


def test_every_header_names_the_metric_it_was_chosen_by(tmp_path):
    trials = make_trials()
    trials["val_loss"] = 1.0 - trials["val_accuracy"]
    trials["test_loss"] = 1.0 - trials["test_accuracy"]
    header = format_summary(summarize(trials, "val_loss"), "val_loss").splitlines()[0]
    assert "best val_loss" in header and "test_loss of best" in header and "accuracy" not in header
    write_trials(trials, results_dir(tmp_path))
    md = write_report(tmp_path, metric="val_loss")["summary_md"].read_text()
    assert "| best val_loss |" in md and "chosen by `val_loss`" in md and "val_accuracy" not in md


# ---------------------------------------------------------------------------------------------- search agreement


def test_the_report_says_whether_the_searches_of_different_seeds_agree(tmp_path, capsys):
    from flexora_tune.results import SEARCH_AGREEMENT_FILE
    from flexora_tune.stability import expected_jaccard

    paths = write_report(results_dir(tmp_path))
    data = json.loads((tmp_path / SEARCH_AGREEMENT_FILE).read_text())
    flexora = data["flexora"]  # the errored f1-search is left out; f1-search2 is seed 1's search
    assert set(data) == {"flexora"} and flexora["n_searches"] == 2 and flexora["seeds"] == [0, 1]
    assert flexora["trial_ids"] == ["f0-search", "f1-search2"] and flexora["blocks"] == [[0, 2, 4], [3, 5]]
    selections = flexora["selections"]
    assert selections["observed"] == 0.0 and selections["expected"] == pytest.approx(expected_jaccard(3, 2, L))
    assert selections["p_value"] == 1.0 and selections["verdict"] == "no more agreement than random subsets (p=1)"
    assert flexora["k"] == 3 and flexora["top_k"]["observed"] == 1.0  # both alphas rank blocks 3, 4, 5 first
    assert flexora["top_k"]["p_value"] == pytest.approx(1 / 20, abs=0.01) and flexora["separations"] == []
    line = flexora["line"]
    assert line.startswith("flexora searches (2 seeds): Jaccard 0.000 vs 0.") and "p=1: no more agreement" in line
    assert f"[report] {line}" in capsys.readouterr().out
    md = paths["summary_md"].read_text()
    assert line in md and "Search agreement across seeds" in md


def _search_row(trial_id: str, seed: int, blocks: list[int], start: float, status: str = "TERMINATED",
                separation: float = 4.2) -> dict:
    return {"trial_id": trial_id, "strategy": "flexora", "seed": seed, "stage": "search", "blocks": json.dumps(blocks),
            "num_blocks": len(blocks), "num_blocks_total": L, "compute_s": 1.0, "start_time": start, "status": status,
            "alpha": json.dumps([1.0 if b in blocks else -1.0 for b in range(L)]), "alpha_separation": separation}


def test_agreeing_searches_are_called_so_and_a_single_search_writes_no_agreement(tmp_path, capsys):
    from flexora_tune.results import SEARCH_AGREEMENT_FILE

    trials = make_trials()
    trials = trials[trials["stage"] != "search"]
    extra = [_search_row(f"s{seed}", seed, [1, 4], 0.0) for seed in range(4)]
    extra += [_search_row("s0-late", 0, [1, 4], 1.0, separation=5.0),  # seed 0's later search replaces s0
              _search_row("s1-cut", 1, [0, 2, 3, 5], 2.0, status="EARLY_STOPPED")]  # never a finished selection
    write_trials(pd.concat([trials, pd.DataFrame(extra)], ignore_index=True), tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(META))
    md = write_report(tmp_path)["summary_md"].read_text()
    flexora = json.loads((tmp_path / SEARCH_AGREEMENT_FILE).read_text())["flexora"]
    assert flexora["trial_ids"] == ["s0-late", "s1", "s2", "s3"] and flexora["separations"] == [5.0, 4.2, 4.2, 4.2]
    assert flexora["selections"]["verdict"] == "agree beyond chance (p<0.001)" and flexora["k"] == 2
    assert "p<0.001: agree beyond chance" in md and "median separation 4.2 (4/4 searches separated)" in md
    assert "agree beyond chance" in capsys.readouterr().out

    write_trials(pd.concat([trials, pd.DataFrame(extra[:1])], ignore_index=True), tmp_path)
    md = write_report(tmp_path)["summary_md"].read_text()
    assert not (tmp_path / SEARCH_AGREEMENT_FILE).exists() and "Search agreement" not in md
    assert "[report]" not in capsys.readouterr().out
