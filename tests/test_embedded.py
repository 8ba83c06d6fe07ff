"""The embedded defaults (SmolLM2-135M from a GGUF file, all-MiniLM-L6-v2, BBC News) load with no network."""

from __future__ import annotations

import os

import pytest

from flexora_tune import find_blocks, finetune, load_model, load_task

SMALL_BBC = {"source": "default", "val_size": 16, "test_size": 16, "search_val_size": 8, "max_examples": 200}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_bbc_news_ships_five_topics_and_about_2100_unique_articles():
    task = load_task("default")
    assert task.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert 2000 <= sum(task.sizes().values()) <= 2225
    assert task.sizes()["test"] == 400


def test_minilm_loads_offline_with_six_bert_blocks():
    model, tokenizer = load_model("minilm", "classification", num_labels=5)
    layout = find_blocks(model)
    assert (layout.path, layout.num_blocks, layout.target_modules) == ("bert.encoder.layer", 6, ("query", "value"))
    assert tokenizer("hello world")["input_ids"]


@pytest.mark.slow
def test_default_smollm2_loads_offline_and_fine_tunes(tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    result = finetune("default", SMALL_BBC, blocks=[28, 29], seed=0, max_steps=2, batch_size=4, threads=1)
    assert result.num_blocks_total == 30 and result.steps == 2
    assert result.trainable_params > 0 and 0 <= result.val_accuracy <= 1
