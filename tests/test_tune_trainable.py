"""The trainable's config handling (no Ray session): keys, stages, subsets, step planning."""

from __future__ import annotations

import pickle

import pytest

from flexora_tune import FinetuneSettings
from flexora_tune.finetune import planned_steps
from flexora_tune.search import encode_layers
from flexora_tune.tune_trainable import parse_config


def test_defaults_are_a_plain_lora_finetune():
    trial = parse_config({})
    assert (trial.stage, trial.seed, trial.selection, trial.label) == ("finetune", 0, None, "all")


def test_subset_in_either_encoding(tiny_llama_dir):
    by_dict = parse_config({"layers": encode_layers([1, 3], 4)})
    by_list = parse_config({"model": str(tiny_llama_dir), "blocks": [3, 1]})
    assert by_dict.selection == by_list.selection and by_dict.selection.blocks == (1, 3)
    with pytest.raises(ValueError, match="once"):
        parse_config({"layers": encode_layers([1], 4), "blocks": [1]}, num_blocks=4)


def test_each_stage_keeps_its_settings_and_rejects_unknown_keys():
    config = {"epochs": 2, "steps": 5, "lr": 1e-3, "r": 4, "search": {"lr": 5e-3}, "finetune": {"max_steps": 3}}
    finetune = parse_config(config)
    search = parse_config({**config, "stage": "search"})
    assert dict(finetune.settings) == {"epochs": 2, "lr": 1e-3, "r": 4, "max_steps": 3}
    assert dict(search.settings) == {"steps": 5, "lr": 5e-3, "r": 4}
    assert dict(search.finetune_settings) == dict(finetune.settings)  # what the search is sized against
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epoch'\]"):
        parse_config({"epoch": 3})
    with pytest.raises(ValueError, match="unknown search setting"):
        parse_config({"stage": "finetune", "search": {"epochs": 3}})
    with pytest.raises(ValueError, match="chooses its own blocks"):
        parse_config({"stage": "search", "layers": encode_layers([0], 2)})
    with pytest.raises(ValueError, match="'search' or 'finetune'"):
        parse_config({"stage": "train"})


def test_trainable_is_public_and_picklable():
    import flexora_tune
    from flexora_tune import trainable

    assert trainable is flexora_tune.trainable and callable(trainable)
    assert pickle.loads(pickle.dumps(trainable)) is trainable


def test_planned_steps_matches_finetune_budget():
    assert planned_steps(120, FinetuneSettings()) == 45
    assert planned_steps(120, FinetuneSettings(max_steps=4)) == 4
    assert planned_steps(120, FinetuneSettings(epochs=1, max_train_examples=20, batch_size=8)) == 3


def test_search_reports_hold_the_worst_value_of_each_finetune_metric():
    from flexora_tune.tune_trainable import SEARCH_PLACEHOLDERS

    inf = float("inf")
    assert SEARCH_PLACEHOLDERS == {"val_accuracy": -inf, "val_loss": inf, "test_accuracy": -inf, "train_loss": inf}
