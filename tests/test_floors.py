"""Floors: majority-class and no-fine-tune accuracy, computed per split, shown as reference rows of the summary and
lines on the best-so-far plot; strategies that do not beat the majority class are marked, and when none does the
report warns once and best_selection.json records it. A tiny task whose labels are 80/20 and carry no signal
fires the warning; the tiny keyword task, which carries signal, does not."""

from __future__ import annotations

import json
import math
import random
import re

import pandas as pd
import pytest
import tiny

from flexora_tune.cli import main
from flexora_tune.finetune import finetune
from flexora_tune.floors import (
    NO_HEAD_NOTE,
    compute_floors,
    majority_class_floor,
    majority_line,
    read_floors,
    write_floors,
)
from flexora_tune.models import load_model
from flexora_tune.objective import evaluate
from flexora_tune.report import FLOOR_COLUMNS, SUMMARY_COLUMNS, format_summary, summarize, write_report, write_trials
from flexora_tune.results import BEATS_MAJORITY_CLASS, FLOORS_FILE, MAJORITY_CLASS, NO_FINE_TUNE
from flexora_tune.tasks import load_task

SPLITS = {"search_val_size": 20, "val_size": 40, "test_size": 40}
WARNING = "warning: no strategy beats the majority-class floor"


def _no_signal_rows(n: int = 200) -> list[dict[str, str]]:
    """Filler texts with labels drawn 80/20 independently of the text: nothing to learn but the frequencies."""
    rng = random.Random(7)
    labels = ["common"] * (n * 4 // 5) + ["rare"] * (n - n * 4 // 5)
    rng.shuffle(labels)
    return [{"text": " ".join(rng.choice(tiny.FILLER) for _ in range(rng.randint(6, 10))), "label": label}
            for label in labels]


@pytest.fixture(scope="module")
def no_signal_task(tmp_path_factory) -> dict:
    path = tiny.write_csv(tmp_path_factory.mktemp("floors") / "eighty_twenty.csv", _no_signal_rows())
    return {"source": str(path), "max_length": 16, **SPLITS}


def _share(examples, label: int) -> float:
    return sum(ex.label == label for ex in examples) / len(examples)


# ------------------------------------------------------------------------------------------- computing


def test_majority_class_floor_counts_the_training_labels(no_signal_task):
    data = load_task(no_signal_task)
    common = data.label_names.index("common")
    floor = majority_class_floor(data)
    assert floor.applies and floor.note.startswith("always 'common'")
    assert floor.value("val_accuracy") == pytest.approx(_share(data.val, common))
    assert floor.value("test_accuracy") == pytest.approx(_share(data.test, common))
    counts = [sum(ex.label == c for ex in data.train) for c in range(2)]
    prior = [(n + 1) / (len(data.train) + 2) for n in counts]  # the training frequencies, add-one smoothed
    assert floor.value("val_loss") == pytest.approx(-sum(math.log(prior[ex.label]) for ex in data.val) / 40)
    # only the training examples a fine-tune sees count: the first 5 here
    few = majority_class_floor(data, max_train_examples=5)
    assert few.note.endswith("of 5 examples)")


def test_classification_floors_say_no_fine_tune_does_not_apply(no_signal_task, tmp_path):
    floors = write_floors(tmp_path, "no model is loaded for a classification head", no_signal_task,
                          {"finetune": {"max_train_examples": 50}})
    assert floors.train_examples == 50 and floors.split_sizes == {"val": 40, "test": 40}
    none = floors.get(NO_FINE_TUNE)
    assert not none.applies and none.note == NO_HEAD_NOTE and none.value("val_accuracy") is None
    assert read_floors(tmp_path) == floors
    saved = json.loads((tmp_path / FLOORS_FILE).read_text())
    assert [f["name"] for f in saved["floors"]] == [MAJORITY_CLASS, NO_FINE_TUNE] and "every seed" in saved["seeds"]
    (tmp_path / FLOORS_FILE).write_text(json.dumps({**saved, "train_examples": 1}))
    assert write_floors(tmp_path, "x", no_signal_task, reuse=True).train_examples == 1  # a resume reads them back


def test_causal_lm_no_fine_tune_floor_scores_the_choices_zero_shot(tiny_llama_dir, tmp_path):
    rows = [{"prompt": r["text"], "answer": r["label"]} for r in tiny.classification_rows(160)]
    task = {"source": str(tiny.write_csv(tmp_path / "qa.csv", rows)), "max_length": 32, **SPLITS}
    floors = compute_floors(str(tiny_llama_dir), task)
    data = load_task(task)
    answers = [ex.answer.strip() for ex in data.train]
    top = max(sorted(set(answers)), key=answers.count)
    assert floors.kind == "causal_lm" and floors.majority.note.startswith(f"always {top!r}")
    assert floors.majority.value("val_accuracy") == pytest.approx(
        sum(ex.answer.strip() == top for ex in data.val) / len(data.val))
    model, tokenizer = load_model(str(tiny_llama_dir), "causal_lm")
    expected = evaluate(model, tokenizer, data.val, "causal_lm", 32, 32, model.device)
    zero_shot = floors.get(NO_FINE_TUNE)
    assert zero_shot.applies and zero_shot.value("val_accuracy") == pytest.approx(expected["accuracy"])
    assert zero_shot.value("val_loss") == pytest.approx(expected["loss"])
    assert 0 <= zero_shot.value("test_accuracy") <= 1
    assert floors.majority.value("val_loss") is None  # a token-level loss has no constant-prediction floor
    summary = summarize(_trials({"all": (0.9, 0.9)}), floors=floors).set_index("strategy")
    assert summary.loc[NO_FINE_TUNE, "best_val_mean"] == pytest.approx(expected["accuracy"])
    assert set(floors.values("val_accuracy")) == {MAJORITY_CLASS, NO_FINE_TUNE}  # both lines on the plot
    unmeasured = compute_floors(str(tmp_path / "no-such-model"), task).get(NO_FINE_TUNE)
    assert not unmeasured.applies and unmeasured.note.startswith("not measured: ")  # a floor never stops a compare


def test_majority_line_says_whether_a_run_beats_the_floor(no_signal_task):
    rate = majority_class_floor(load_task(no_signal_task)).value("val_accuracy")
    assert f"validation split: {rate:.3f}" in majority_line(no_signal_task)
    assert "beats it by 0.100" in majority_line(no_signal_task, rate + 0.1)
    assert "does not beat it" in majority_line(no_signal_task, rate) and "more epochs" in majority_line(
        no_signal_task, rate)


# ------------------------------------------------------------------------------------------- the report


def _trials(values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """One fine-tune per strategy (seed 0): strategy -> (val, test)."""
    rows = [{"trial_id": f"{name}-0", "strategy": name, "seed": 0, "stage": "finetune", "blocks": f"[{i}]",
             "num_blocks": 1, "num_blocks_total": 4, "val_accuracy": val, "test_accuracy": test,
             "val_loss": 0.5, "compute_s": 2.0 + i, "start_time": float(i), "status": "TERMINATED"}
            for i, (name, (val, test)) in enumerate(values.items())]
    return pd.DataFrame(rows)


def _folder(path, task, values: dict[str, tuple[float, float]], model: str = "unused"):
    path.mkdir(parents=True, exist_ok=True)
    write_trials(_trials(values), path)
    (path / "meta.json").write_text(json.dumps({"metric": "val_accuracy", "mode": "max", "reference": "all",
                                                "target_modules": ["q_proj"], "layers_pattern": "layers"}))
    return write_floors(path, model, task)


def _floor(task: dict) -> float:
    return majority_class_floor(load_task(task)).value("val_accuracy")


def test_no_strategy_above_the_floor_is_marked_warned_and_recorded(no_signal_task, tmp_path, capsys):
    floor = _floor(no_signal_task)
    floors = _folder(tmp_path, no_signal_task, {"all": (floor - 0.1, 0.75), "last-k": (floor, 0.80)})
    assert floors.majority.value("val_accuracy") == floor
    assert main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(WARNING) == 1 and "more training examples" in printed
    table = printed.split("wrote")[0]
    assert re.search(rf"majority-class \(floor\) +{floor:.3f} +{floors.majority.value('test_accuracy'):.3f}", table)
    assert re.search(r"no-fine-tune \(floor\) +n/a +n/a", table)
    assert f"{floor:.3f} (≤ floor)" in table  # a tie does not beat the floor
    assert f"{floor - 0.1:.3f} (≤ floor)" in table and "Floor rows are references, not strategies" in table

    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == [*SUMMARY_COLUMNS, *FLOOR_COLUMNS]
    assert list(summary["kind"]) == ["strategy", "strategy", "floor", "floor"]
    assert list(summary["strategy"][2:]) == [MAJORITY_CLASS, NO_FINE_TUNE]
    assert summary.loc[2, "best_val_mean"] == pytest.approx(floor)
    assert summary.loc[2, "test_of_best_mean"] == pytest.approx(floors.majority.value("test_accuracy"))
    assert not summary[BEATS_MAJORITY_CLASS][:2].astype(bool).any()

    best = json.loads((tmp_path / "best_selection.json").read_text())
    assert best["strategy"] == "last-k" and best[BEATS_MAJORITY_CLASS] is False
    assert best["majority_class"]["val_accuracy"] == pytest.approx(floor)
    assert best["floor_warning"].startswith(WARNING)
    md = (tmp_path / "summary.md").read_text()
    assert f"| majority-class (floor) | {floor:.3f} |" in md and "**Warning: no strategy beats" in md


def test_a_strategy_above_the_floor_clears_the_warning(no_signal_task, tmp_path):
    floor = _floor(no_signal_task)
    _folder(tmp_path, no_signal_task, {"all": (floor - 0.1, 0.75), "flexora": (floor + 0.025, 0.78)})
    write_report(tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    text = format_summary(summary)
    assert WARNING not in text and "majority-class (floor)" in text
    flexora = text.splitlines()[2]
    assert flexora.startswith("flexora") and f"{floor + 0.025:.3f}" in flexora and "floor" not in flexora
    assert f"{floor - 0.1:.3f} (≤ floor)" in text  # all is still below
    assert json.loads((tmp_path / "best_selection.json").read_text())[BEATS_MAJORITY_CLASS] is True
    assert "floor_warning" not in json.loads((tmp_path / "best_selection.json").read_text())


def test_val_loss_is_compared_with_the_label_prior_and_old_folders_keep_their_columns(no_signal_task, tmp_path):
    floors = _folder(tmp_path / "loss", no_signal_task, {"all": (0.70, 0.75)})
    summary = summarize(_trials({"all": (0.70, 0.75)}), "val_loss", floors=floors)
    prior = floors.majority.value("val_loss")
    assert summary.set_index("strategy").loc[MAJORITY_CLASS, "best_val_mean"] == pytest.approx(prior)
    assert summary.loc[0, BEATS_MAJORITY_CLASS] == (0.5 < prior)
    assert "(≥ floor)" in format_summary(summary, "val_loss") or 0.5 < prior
    old = summarize(_trials({"all": (0.70, 0.75)}))  # no floors.json: the summary of before
    assert list(old.columns) == list(SUMMARY_COLUMNS) and "floor" not in format_summary(old)


# ------------------------------------------------------------------------------------------- on the tiny model


def test_the_keyword_task_carries_signal_and_beats_its_floor(tiny_llama_dir, tiny_csv, tmp_path):
    task = {"source": str(tiny_csv), "max_length": 32}
    result = finetune(str(tiny_llama_dir), task, blocks=[1, 3], seed=0, epochs=3, lr=1e-2)
    folder = tmp_path / "signal"
    floors = _folder(folder, task, {"all": (result.val_accuracy, result.test_accuracy)}, str(tiny_llama_dir))
    assert result.val_accuracy > floors.majority.value("val_accuracy")
    write_report(folder)
    assert WARNING not in format_summary(pd.read_csv(folder / "summary.csv"))
    assert json.loads((folder / "best_selection.json").read_text())[BEATS_MAJORITY_CLASS] is True


def test_finetune_and_search_print_the_majority_class_rate(tiny_llama_dir, no_signal_task, tmp_path, capsys):
    common = ["--model", str(tiny_llama_dir), "--task", no_signal_task["source"], "--max-length", "16",
              "--val-size", "40", "--test-size", "40", "--search-val-size", "20"]
    assert main(["finetune", *common, "--max-steps", "2", "--blocks", "0"]) == 0
    printed = capsys.readouterr().out
    rate = f"majority class on the validation split: {_floor(no_signal_task):.3f}"
    assert f"{rate}, always 'common'" in printed and "val_accuracy" in printed.splitlines()[-1]
    assert main(["search", *common, "--steps", "2", "--out", str(tmp_path / "selection.json")]) == 0
    assert rate in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.ray
@pytest.mark.slow
def test_compare_on_a_task_without_signal_shows_the_floor_and_warns(ray_session, tiny_llama_dir, no_signal_task,
                                                                    tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", "--model", str(tiny_llama_dir), "--task", no_signal_task["source"], "--max-length", "16",
                 "--val-size", "40", "--test-size", "40", "--search-val-size", "20", "--strategies", "all,last-k",
                 "--k", "2", "--trials", "1", "--max-steps", "4", "--lr", "1e-2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"[floors] floors: majority-class val {_floor(no_signal_task):.3f}" in printed
    assert "majority-class (floor)" in printed and printed.count(WARNING) == 1
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary.loc[summary["kind"] == "floor", "strategy"]) == [MAJORITY_CLASS, NO_FINE_TUNE]
    assert sorted(summary.loc[summary["kind"] == "strategy", "strategy"]) == ["all", "last-k"]
    best = json.loads((out / "best_selection.json").read_text())
    assert best[BEATS_MAJORITY_CLASS] is False
    assert best["majority_class"]["val_accuracy"] == pytest.approx(_floor(no_signal_task))
