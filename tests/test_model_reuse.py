"""Reused trial workers: the per-process cache of pristine models and loaded tasks gives every caller a clean
model, the same numbers as a fresh load for the same seed, and a different model when asked for one."""

from __future__ import annotations

import dataclasses
import os
import weakref

import pytest
import tiny
import torch
from peft.tuners.lora import LoraLayer

from flexora_tune import model_cache, models
from flexora_tune.finetune import LoraSettings, finetune, open_lora_session
from flexora_tune.tasks import clear_task_cache, load_task

FAST = {"max_steps": 4, "eval_every": 2, "batch_size": 8, "lr": 5e-3}


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    models.release_cached_models()
    yield
    models.release_cached_models()


@pytest.fixture
def task(tiny_csv):
    return {"source": str(tiny_csv), "max_length": 32}


def lora_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def only_entry() -> model_cache.CachedModel:
    assert len(model_cache.MODEL_CACHE.entries) == 1
    return next(iter(model_cache.MODEL_CACHE.entries.values()))


def metrics(result) -> dict:
    keep = ("val_accuracy", "test_accuracy", "val_loss", "train_loss", "trainable_params", "steps")
    return {**{k: getattr(result, k) for k in keep},
            "history": [{k: v for k, v in h.items() if not k.endswith("_s")} for h in result.history]}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_load_gives_from_pretrained_weights_and_rng_cached_or_not(family, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    path = str(tiny.save_model_dir(tmp_path / family, family))
    torch.manual_seed(7)
    expected = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).state_dict()
    expected_rng = torch.get_rng_state()
    for setting in ("0", "1", "1"):  # a plain load, a cache miss, a copy of the cached model
        monkeypatch.setenv(models.CACHE_ENV, setting)
        torch.manual_seed(7)
        model, _ = models.load_model(path, "classification", num_labels=3)
        assert torch.equal(torch.get_rng_state(), expected_rng)
        got = model.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), setting
    torch.manual_seed(8)
    other, _ = models.load_model(path, "classification", num_labels=3)
    head = next(n for n in only_entry().fresh if n.endswith("weight"))
    assert not torch.equal(other.state_dict()[head], expected[head])  # a new seed draws a new head


def test_finetune_same_numbers_with_and_without_cache(tiny_llama_dir, task, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, "0")
    plain = [metrics(finetune(str(tiny_llama_dir), task, [1, 3], seed=s, **FAST)) for s in (0, 1)]
    monkeypatch.setenv(models.CACHE_ENV, "1")
    clear_task_cache()
    for _ in range(2):  # a cache miss, then copies of the cached model
        assert [metrics(finetune(str(tiny_llama_dir), task, [1, 3], seed=s, **FAST)) for s in (0, 1)] == plain
        assert len(model_cache.MODEL_CACHE.entries) == 1


def test_a_new_session_has_only_its_own_lora(tiny_llama_dir, task, monkeypatch):
    data = load_task(task)
    settings = LoraSettings(batch_size=8)
    first = open_lora_session(str(tiny_llama_dir), data, None, settings, seed=0)
    assert len(lora_modules(first.model)) == 8  # q_proj and v_proj of 4 blocks
    second = open_lora_session(str(tiny_llama_dir), data, [2], settings, seed=0)
    names = lora_modules(second.model)
    assert len(names) == 2 and all(".layers.2." in n for n in names), names
    assert not any("base_layer" in n or "lora_" in n for n, _ in only_entry().model.named_modules())
    assert first.model.base_model.model is not second.model.base_model.model
    # same parameters, trainable ones included, as a session built from a fresh load
    monkeypatch.setenv(models.CACHE_ENV, "0")
    fresh = open_lora_session(str(tiny_llama_dir), data, [2], settings, seed=0)
    assert second.trainable_params == fresh.trainable_params
    mine, theirs = second.model.state_dict(), fresh.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_cached_model_is_unchanged_by_a_trial(tiny_llama_dir, task):
    finetune(str(tiny_llama_dir), task, None, seed=0, **FAST)
    entry = only_entry()
    before = {k: v.clone() for k, v in entry.model.state_dict().items()}
    structure = [n for n, _ in entry.model.named_modules()]
    flags = {n: p.requires_grad for n, p in entry.model.named_parameters()}
    finetune(str(tiny_llama_dir), task, [0, 1], seed=3, **FAST)
    assert only_entry() is entry and entry.intact()
    after = entry.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [n for n, _ in entry.model.named_modules()] == structure
    assert {n: p.requires_grad for n, p in entry.model.named_parameters()} == flags


def test_a_weight_written_in_place_is_detected_and_reloaded(tiny_llama_dir):
    model, _ = models.load_model(str(tiny_llama_dir), "causal_lm")
    weight = model.model.layers[0].self_attn.q_proj.weight
    cached = only_entry().model.model.layers[0].self_attn.q_proj.weight
    assert weight is not cached and weight.data_ptr() == cached.data_ptr()  # shared storage: no second copy
    pristine = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    with pytest.warns(RuntimeWarning, match="modified in place"):
        again, _ = models.load_model(str(tiny_llama_dir), "causal_lm")
    assert torch.equal(again.model.layers[0].self_attn.q_proj.weight, pristine)


def test_another_model_is_loaded_anew(tiny_llama_dir, tmp_path, monkeypatch):
    bert = str(tiny.save_model_dir(tmp_path / "bert", "bert"))
    llama, _ = models.load_model(str(tiny_llama_dir), "classification", num_labels=2)
    other, _ = models.load_model(bert, "classification", num_labels=2)
    assert llama.config.model_type == "llama" and other.config.model_type == "bert"
    assert only_entry().model.config.model_type == "bert"  # one model per process by default: llama evicted
    assert models.cached_model_bytes() == model_cache.storage_bytes(only_entry().model)
    back, _ = models.load_model(str(tiny_llama_dir), "classification", num_labels=2)
    assert back.config.model_type == "llama"
    lm, _ = models.load_model(str(tiny_llama_dir), "causal_lm")  # another head: another key
    assert type(lm).__name__ == "LlamaForCausalLM"
    three, _ = models.load_model(str(tiny_llama_dir), "classification", num_labels=3)
    assert three.config.num_labels == 3 and three.score.out_features == 3
    monkeypatch.setenv(models.CACHE_ENV, "2")
    models.load_model(bert, "classification", num_labels=2)
    assert sorted(e.model.config.model_type for e in model_cache.MODEL_CACHE.entries.values()) == ["bert", "llama"]


def test_a_rewritten_model_directory_is_reloaded(tmp_path):
    path = tiny.save_model_dir(tmp_path / "m", "llama")
    first, _ = models.load_model(str(path), "causal_lm")
    tiny.save_model_dir(path, "llama", num_hidden_layers=2)
    second, _ = models.load_model(str(path), "causal_lm")
    assert len(first.model.layers) == 4 and len(second.model.layers) == 2


def test_trial_memory_is_released(tiny_llama_dir, task):
    finetune(str(tiny_llama_dir), task, [0], seed=0, **FAST)
    assert models.release_trial_memory() == 0  # the trial's copy went with its last reference
    session = open_lora_session(str(tiny_llama_dir), load_task(task), None, LoraSettings(), seed=0)
    gone = weakref.ref(session.model)
    assert models.release_trial_memory() == 1  # still held
    del session
    assert gone() is None  # freed by reference counting: no cycles keep a trial's model alive
    assert models.release_trial_memory() == 0 and len(model_cache.MODEL_CACHE.entries) == 1
    assert models.release_cached_models() == 1 and models.cached_model_bytes() == 0


def test_tasks_are_cached_by_spec_and_file(tmp_path):
    path = tiny.write_csv(tmp_path / "t.csv", tiny.classification_rows(60))
    spec = {"source": str(path), "max_length": 16}
    first = load_task(spec)
    assert load_task(spec) is first
    assert load_task({**spec, "split_seed": 1}) is not first
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.train = ()  # type: ignore[misc]
    assert isinstance(first.train, tuple) and dataclasses.is_dataclass(first.train[0])
    tiny.write_csv(path, tiny.classification_rows(80))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert sum(load_task(spec).sizes().values()) == 80


def logged_trainable(config):
    """The real trainable, noting which worker process ran which trial (to see that actors were reused)."""
    from ray import tune

    from flexora_tune import trainable

    config = dict(config)
    log = config.pop("_pid_log")
    with open(log, "a") as f:
        f.write(f"{tune.get_context().get_trial_id()} {os.getpid()}\n")
    try:
        trainable(config)
    finally:
        models.release_trial_memory()


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_tune_sweep_with_reused_actors_gives_the_same_results(tiny_llama_dir, task, tmp_path):
    from ray import tune

    space = {"model": str(tiny_llama_dir), "task": task, **FAST,
             "blocks": tune.grid_search([[0], [1, 2], [3], [0, 3]])}
    results, pids = {}, {}
    for reuse in (False, True):
        log = tmp_path / f"pids_{reuse}.txt"
        analysis = tune.run(logged_trainable, config={**space, "_pid_log": str(log)}, reuse_actors=reuse,
                            storage_path=str(tmp_path / str(reuse)), verbose=0)
        df = analysis.dataframe()
        results[reuse] = {r["blocks"]: (r["val_accuracy"], r["test_accuracy"], r["val_loss"], r["train_loss"])
                          for _, r in df.iterrows()}
        pids[reuse] = [line.split()[1] for line in log.read_text().splitlines()]
    assert len(results[True]) == 4 and results[True] == results[False]
    assert len(set(pids[True])) < 4  # some worker ran two trials
    assert len(set(pids[False])) == 4
