"""Task specs: sources, column mapping, seeded disjoint splits, and clear errors on bad data."""

from __future__ import annotations

import json

import pytest
import tiny

from flexora_tune.tasks import SPLITS, TaskError, TaskSpec, load_task, resolve_task


def _texts(task, split):
    return [ex.text for ex in task.split(split)]


def test_splits_are_disjoint_cover_the_data_and_are_seeded(tiny_csv):
    task = load_task({"source": str(tiny_csv), "val_size": 20, "test_size": 0.2, "search_val_size": 10})
    assert task.sizes() == {"train": 130, "search_val": 10, "val": 20, "test": 40}
    seen = [text for split in SPLITS for text in _texts(task, split)]
    assert len(seen) == len(set(seen)) == 200
    again = load_task({"source": str(tiny_csv), "val_size": 20, "test_size": 0.2, "search_val_size": 10})
    assert _texts(again, "test") == _texts(task, "test")
    other = load_task({"source": str(tiny_csv), "val_size": 20, "test_size": 0.2, "search_val_size": 10,
                       "split_seed": 1})
    assert _texts(other, "test") != _texts(task, "test")


def test_classification_labels_are_indexed_by_sorted_name(tiny_csv):
    task = load_task(str(tiny_csv))
    assert task.kind == "classification" and task.label_names == ("money", "sport")
    for ex in task.train:
        assert any(w in ex.text.split() for w in tiny.CLASS_WORDS[task.label_names[ex.label]])


def test_column_mapping_and_jsonl(tmp_path):
    rows = [{"body": r["text"], "topic": r["label"]} for r in tiny.classification_rows(60)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task({"source": str(path), "text_column": "body", "label_column": "topic"})
    assert task.num_labels == 2 and sum(task.sizes().values()) == 60


def test_causal_lm_task_with_choices_column(tmp_path):
    rows = [{"prompt": f"question {i}", "answer": "yes" if i % 2 else "no", "choices": json.dumps(["yes", "no"])}
            for i in range(40)]
    path = tiny.write_csv(tmp_path / "qa.csv", rows)
    task = load_task(str(path))
    assert task.kind == "causal_lm"
    ex = task.train[0]
    assert ex.choices == (" yes", " no") and ex.answer == ex.choices[ex.label]
    assert ex.text.endswith("\nAnswer:")


def test_causal_lm_task_without_choices_scores_against_all_answers(tmp_path):
    rows = [{"prompt": f"q {i}", "answer": ["red", "green", "blue"][i % 3]} for i in range(30)]
    task = load_task(str(tiny.write_csv(tmp_path / "qa.csv", rows)))
    assert task.train[0].choices == (" blue", " green", " red")


def test_hf_datasets_code_path_loads_a_local_dataset_directory(tmp_path):
    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    tiny.write_csv(folder / "train.csv", tiny.classification_rows(50))
    task = load_task({"source": str(folder), "hf_split": "train"})
    assert task.kind == "classification" and sum(task.sizes().values()) == 50


def test_builtin_default_is_bbc_topic_classification():
    spec = resolve_task("default")
    assert spec.source == "bbc" and spec.kind == "classification"
    assert resolve_task("bbc-lm").kind == "causal_lm"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("text,label\n", "no rows"),
        ("words,topic\na,b\nc,d\n", r"\['text', 'label'\] not found; available columns are \['words', 'topic'\]"),
        ("text,label\n" + "".join(f"t{i},same\n" for i in range(20)), "same label"),
        ('text,label\n"unclosed,1\n', "cannot parse"),
    ],
    ids=["empty-file", "no-rows", "unknown-columns", "single-label", "malformed"],
)
def test_bad_csv_gets_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_task(str(path))


def test_missing_file_unknown_setting_and_too_small_data(tmp_path, tiny_csv):
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "nope.csv"))
    with pytest.raises(TaskError, match=r"unknown task settings \['colour'\]"):
        load_task({"source": str(tiny_csv), "colour": "red"})
    with pytest.raises(TaskError, match="too few"):
        load_task({"source": str(tiny_csv), "val_size": 100, "test_size": 100})
    with pytest.raises(TaskError, match="not one of its choices"):
        path = tiny.write_csv(tmp_path / "qa.csv", [{"prompt": "p", "answer": "x", "choices": "a|b"}] * 10)
        load_task(str(path))


def test_unreachable_hf_dataset_names_the_alternatives():
    with pytest.raises(TaskError, match="local .csv/.jsonl"):
        load_task(TaskSpec(source="no-such-org/no-such-dataset-xyz"))
