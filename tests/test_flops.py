"""Compute in FLOPs: the estimate against torch's FlopCounterMode, and the count as a pure function of
settings and data (same runs, resumed runs, thread counts), proportional to steps and to LoRA blocks."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch.utils.flop_counter import FlopCounterMode

import flexora_tune as ft
import flexora_tune.training as training
from flexora_tune.finetune import LoraSettings, finetune_flops, open_lora_session
from flexora_tune.flexora import SearchProgress, SelectionResult, prepare_search
from flexora_tune.flops import FlopModel, TokenCount, batch_tokens
from flexora_tune.objective import encode, loss_fn
from flexora_tune.tasks import load_task

#: The issue's bar for the estimate against FlopCounterMode.
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def task(tiny_csv):
    return load_task({"source": str(tiny_csv), "max_length": 32})


@pytest.fixture(scope="module")
def qa_task(tmp_path_factory):
    rows = [{"prompt": r["text"], "answer": r["label"]} for r in tiny.classification_rows(120)]
    return load_task({"source": str(tiny.write_csv(tmp_path_factory.mktemp("qa") / "qa.csv", rows)),
                      "max_length": 32})


@pytest.fixture
def eager_attention(monkeypatch):
    """Models load with eager attention: FlopCounterMode counts its products (bmm), while the CPU SDPA
    kernel has no FLOP formula in torch and would be missed (on CUDA, SDPA's formulas count the same)."""
    load = training.load_model

    def eager(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.set_attn_implementation("eager")
        return model, tokenizer

    monkeypatch.setattr(training, "load_model", eager)


@pytest.fixture
def restore_threads():
    """Runs that set ``threads`` change torch's global thread count: put it back for the next tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _close(estimate: float, counted: float) -> bool:
    return abs(estimate / counted - 1) <= TOLERANCE


def test_the_formula_costs_frozen_weights_four_and_trainable_six_flops_per_token():
    model = FlopModel(frozen=(100, 100, 100), trainable=(0, 10, 10), head_trainable=5)
    t = TokenCount(rows=2, width=3, answers=2)
    assert model.lowest_trainable == 1 and model.forward(t) == 2 * 6 * 325
    backward_region = 2 * 100 + 2 * 10 + 5
    assert model.train_step(t) == 2 * 6 * 325 + 2 * 6 * backward_region + 2 * 6 * 25
    assert model.gate_pass(t) == model.train_step(t) - model.weight_grads(t)
    attention = FlopModel(frozen=(0, 0), trainable=(1, 0), attention=4)
    assert attention.forward(TokenCount(1, 5, 1)) == 2 * 5 + 4 * 25 * 4 * 2
    assert attention.activation_grads(TokenCount(1, 5, 1)) == 2 * 5 + 8 * 25 * 4 * 2


def test_batch_tokens_count_padded_positions_and_answer_tokens(tiny_llama_dir, task, qa_task):
    session = open_lora_session(str(tiny_llama_dir), qa_task, None, LoraSettings(), 0)
    batch = encode(qa_task.train[:4], session.tokenizer, qa_task.kind, 32)
    t = batch_tokens(batch)
    assert (t.rows, t.width) == tuple(batch.input_ids.shape)
    assert t.answers == int((batch.targets[:, 1:] != -100).sum()) > 0
    assert session.flop_model.output > 0  # the LM head counts at answer tokens only
    classes = batch_tokens(encode(task.train[:4], session.tokenizer, task.kind, 32))
    assert classes.answers == classes.rows == 4


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
@pytest.mark.parametrize("blocks", [None, [0], [3], [1, 2]])
def test_a_fine_tune_step_is_within_15_percent_of_flop_counter(tiny_llama_dir, task, qa_task, eager_attention,
                                                               kind, blocks):
    data = task if kind == "classification" else qa_task
    session = open_lora_session(str(tiny_llama_dir), data, blocks, LoraSettings(), 0)
    batch = encode(data.train[:8], session.tokenizer, data.kind, 32)
    counted = _counted(lambda: loss_fn(session.model, batch, data.kind).backward())
    estimate = session.flop_model.train_step(batch_tokens(batch))
    assert _close(estimate, counted), (estimate, counted)


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_evaluation_flops_match_flop_counter(tiny_llama_dir, task, qa_task, eager_attention, kind):
    data = task if kind == "classification" else qa_task
    session = open_lora_session(str(tiny_llama_dir), data, [1, 3], LoraSettings(), 0)
    counted = _counted(lambda: session.evaluate("val", LoraSettings(eval_batch_size=7)))
    assert session.eval_flops("val", LoraSettings(eval_batch_size=7)) == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("hypergradient", ["first_order", "second_order"])
@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_a_search_step_is_within_15_percent_of_flop_counter(tiny_llama_dir, task, qa_task, eager_attention,
                                                            hypergradient, kind):
    data = task if kind == "classification" else qa_task
    search = prepare_search(str(tiny_llama_dir), data, seed=0, steps=3, hypergradient=hypergradient, val_batches=2)
    counted = _counted(lambda: search.step(0))
    assert _close(search.progress.flops, counted), (search.progress.flops, counted)


def test_a_whole_fine_tune_counts_its_steps_and_evaluations(tiny_llama_dir, task, eager_attention):
    """Training and validation in `flops`, the test evaluations apart: together, what FlopCounterMode sees."""
    holder = {}
    counted = _counted(lambda: holder.update(result=ft.finetune(
        str(tiny_llama_dir), task, blocks=[1, 2], max_steps=4, eval_every=2, lr=1e-2)))
    result = holder["result"]
    assert _close(result.flops + result.test_eval_flops, counted), (result.flops, result.test_eval_flops, counted)
    first, last = result.history
    assert 0 < first["flops"] < last["flops"] == result.flops
    assert last["test_eval_flops"] == 2 * first["test_eval_flops"] == result.test_eval_flops > 0


def test_fine_tune_flops_are_the_same_in_every_run_and_at_any_thread_count(tiny_llama_dir, task, restore_threads):
    kwargs = dict(blocks=[0, 2], max_steps=4, eval_every=2, lr=1e-2, seed=3)
    a = ft.finetune(str(tiny_llama_dir), task, threads=1, **kwargs)
    b = ft.finetune(str(tiny_llama_dir), task, threads=2, **kwargs)
    assert [h["flops"] for h in a.history] == [h["flops"] for h in b.history]
    assert (a.flops, a.test_eval_flops) == (b.flops, b.test_eval_flops) and a.flops > 0


def test_a_resumed_fine_tune_continues_the_flop_count_exactly(tiny_llama_dir, task, tmp_path):
    kwargs = dict(blocks=[1, 2], seed=1, epochs=2, lr=1e-2)
    seen = []
    full = ft.finetune(str(tiny_llama_dir), task, on_eval=lambda m, s: seen.append(m), **kwargs)
    with pytest.raises(tiny.Preempted):
        ft.finetune(str(tiny_llama_dir), task, on_eval=tiny.save_then_preempt(tmp_path / "ckpt"), **kwargs)
    resumed_seen = []
    resumed = ft.finetune(str(tiny_llama_dir), task, resume_from=tmp_path / "ckpt",
                          on_eval=lambda m, s: resumed_seen.append(m), **kwargs)
    assert [m["flops"] for m in seen] == [h["flops"] for h in full.history]
    assert [h["flops"] for h in resumed.history] == [h["flops"] for h in full.history]
    assert resumed_seen[-1]["flops"] == resumed.flops == full.flops
    assert resumed.test_eval_flops == full.test_eval_flops


@pytest.mark.parametrize("settings", [dict(blocks=[1, 3], max_steps=5, eval_every=2, seed=1),
                                      dict(blocks=None, epochs=1, batch_size=16, max_train_examples=40, seed=2)])
def test_a_fine_tunes_flops_are_known_before_it_runs(tiny_llama_dir, task, settings):
    rng = torch.get_rng_state()
    planned = finetune_flops(str(tiny_llama_dir), task, **settings)
    assert torch.equal(torch.get_rng_state(), rng)
    assert planned == ft.finetune(str(tiny_llama_dir), task, **settings).flops > 0


def test_twice_the_steps_about_twice_the_flops(tiny_llama_dir, task):
    short = ft.finetune(str(tiny_llama_dir), task, blocks=[1], max_steps=4, eval_every=2)
    long = ft.finetune(str(tiny_llama_dir), task, blocks=[1], max_steps=8, eval_every=2)
    assert 1.8 < long.flops / short.flops < 2.2
    kwargs = dict(seed=0, lr=1e-2, stop_when_stable=None)
    search_short = ft.search_layers(str(tiny_llama_dir), task, steps=4, **kwargs)
    search_long = ft.search_layers(str(tiny_llama_dir), task, steps=8, **kwargs)
    assert 1.8 < search_long.flops / search_short.flops < 2.2


def test_fewer_lora_blocks_fewer_flops(tiny_llama_dir, task):
    """Fewer LoRA weights cost less; LoRA only high up also cuts the backward pass short."""
    flops = {str(b): ft.finetune(str(tiny_llama_dir), task, blocks=b, max_steps=3).flops
             for b in (None, [0, 1], [0], [3])}
    assert flops["None"] > flops["[0, 1]"] > flops["[0]"] > flops["[3]"]
    assert flops["[3]"] < 0.8 * flops["[0]"]


def test_search_flops_are_reported_resumed_exactly_and_the_same_every_run(tiny_llama_dir, task, tmp_path,
                                                                         restore_threads):
    kwargs = dict(seed=2, steps=7, lr=1e-2, alpha_lr=0.05, report_every=3, stop_when_stable=None)
    seen = []
    full = ft.search_layers(str(tiny_llama_dir), task, on_step=lambda m, s: seen.append(m), **kwargs)
    again = ft.search_layers(str(tiny_llama_dir), task, threads=1, **kwargs)
    assert [m["step"] for m in seen] == [3, 6, 7] and 0 < seen[0]["flops"] < seen[1]["flops"] < seen[2]["flops"]
    assert seen[-1]["flops"] == full.flops == again.flops
    with pytest.raises(tiny.Preempted):
        ft.search_layers(str(tiny_llama_dir), task, on_step=tiny.save_then_preempt(tmp_path / "ckpt"), **kwargs)
    resumed = ft.search_layers(str(tiny_llama_dir), task, resume_from=tmp_path / "ckpt", **kwargs)
    assert resumed.flops == full.flops
    second = ft.search_layers(str(tiny_llama_dir), task, hypergradient="second_order", **kwargs)
    assert second.flops > 2 * full.flops  # per validation batch a LoRA step's cost, and two passes on training


def test_selection_results_and_progress_written_before_flops_still_load(tiny_llama_dir, task):
    result = ft.search_layers(str(tiny_llama_dir), task, seed=0, steps=2)
    assert SelectionResult.from_json(result.to_json()).flops == result.flops > 0
    old = result.to_dict()
    del old["flops"]
    assert SelectionResult.from_dict(old).flops == 0.0
    assert SearchProgress(step=3).flops == 0


def test_pipeline_flops_add_both_stages(tiny_llama_dir, task):
    result = ft.run_pipeline(str(tiny_llama_dir), task, seed=0, search=dict(steps=2), finetune=dict(max_steps=2))
    assert result.flops == result.search.flops + result.finetune.flops > 0
    assert result.to_dict()["flops"] == result.flops


def test_a_generic_loop_counts_batches_without_tokens_by_their_size():
    """`BilevelLoop` on any model: a batch with a ``size`` but no ``input_ids`` counts one token a row."""
    model = FlopModel(frozen=(1, 1), trainable=(1, 1))
    assert model.train_step(batch_tokens(type("B", (), {"size": 4})())) == 4 * (2 * 4 + 2 * 4 + 2 * 2)
    assert batch_tokens(object()).tokens == 0
    assert batch_tokens(type("B", (), {"input_ids": torch.zeros(2, 5), "targets": torch.zeros(2)})()).answers == 2
