"""The Flexora search: gates, the bilevel steps, the hypergradient, selection, resume, export and safety."""

from __future__ import annotations

import math
import re

import pytest
import tiny
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from tiny import PointBatch
from torch import nn
from transformers import AutoModelForSequenceClassification

import flexora_tune as ft
from flexora_tune.blocks import BlockSelection, attach_lora, find_blocks
from flexora_tune.finetune import FinetuneSettings, LoraSettings, open_lora_session, planned_steps
from flexora_tune.flexora import (
    STATE_FILE,
    BilevelLoop,
    SearchSettings,
    SelectionResult,
    default_search_steps,
    prepare_search,
    rank_correlation,
    search_set_size,
    select_blocks,
)
from flexora_tune.gates import BlockGates
from flexora_tune.models import load_model
from flexora_tune.objective import Batch, encode
from flexora_tune.tasks import load_task


@pytest.fixture(scope="module")
def task(tiny_csv):
    return load_task({"source": str(tiny_csv), "max_length": 32})


def _lora_layers(model, layout):
    root = model.get_base_model()
    pattern = re.compile(rf"^{re.escape(layout.path)}\.(\d+)\.")
    return [(int(pattern.match(n).group(1)), m) for n, m in root.named_modules() if isinstance(m, LoraLayer)]


def _randomise_lora(model, scale: float = 0.5) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_gate_scales_each_lora_delta_by_exactly_its_blocks_gate(tiny_llama_dir, task):
    session = open_lora_session(str(tiny_llama_dir), task, None, LoraSettings(), seed=0)
    model, layout = session.model.double(), session.layout
    torch.manual_seed(1)
    _randomise_lora(model)
    batch = encode(task.train[:4], session.tokenizer, task.kind, 32)
    model.eval()
    plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    gates = BlockGates(layout.num_blocks, dtype=torch.float64)
    placement = gates.attach(model, layout)
    assert sorted(placement) == list(range(layout.num_blocks))
    assert all(len(v) == 2 for v in placement.values())  # q_proj and v_proj, each gated once
    gated = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert _rel(gated, plain) < 1e-12  # alpha = 0: every gate is 1, plain LoRA

    layers = _lora_layers(model, layout)
    x = torch.randn(2, 5, 32, dtype=torch.float64)

    def deltas():
        with torch.no_grad():
            return [m(x) - m.base_layer(x) for _, m in layers]

    at_one = deltas()
    with torch.no_grad():
        gates.alpha.copy_(torch.tensor([0.7, -1.2, 0.3, 1.5], dtype=torch.float64))
    g = gates.values().detach()
    assert not torch.allclose(g, torch.ones_like(g))
    for (block, _), delta, base in zip(layers, deltas(), at_one, strict=True):
        assert _rel(delta, g[block] * base) < 1e-6
    for block in range(layout.num_blocks):  # permuting the other blocks' alphas leaves g[block]'s modules alone
        others = [b for b in range(layout.num_blocks) if b != block]
        before = [d for (b, _), d in zip(layers, deltas(), strict=True) if b == block]
        with torch.no_grad():
            gates.alpha[others] = gates.alpha[others].roll(1)
        after = [d for (b, _), d in zip(layers, deltas(), strict=True) if b == block]
        assert all(_rel(a, b) < 1e-12 for a, b in zip(before, after, strict=True))
    gates.remove()
    assert torch.equal(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, plain)


def test_alpha_moves_only_in_the_gate_step_and_lora_only_in_the_lora_step(tiny_llama_dir, task):
    search = prepare_search(str(tiny_llama_dir), task, seed=0, lr=1e-2, steps=2)
    alpha = search.alpha
    weights = [p.detach().clone() for p in search.params]
    alpha_before = alpha.detach().clone()

    search.lora_step(search.train_batch(0))
    assert alpha.grad is None and torch.equal(alpha, alpha_before)
    assert any(not torch.equal(p, w) for p, w in zip(search.params, weights, strict=True))
    assert all(p.grad is None for p in search.params)

    weights = [p.detach().clone() for p in search.params]
    search.gate_grad_first_order(search.val_batches(0))
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    assert all(p.grad is None for p in search.params)
    search.alpha_optimizer.step()
    assert not torch.equal(alpha, alpha_before)
    assert all(torch.equal(p, w) for p, w in zip(search.params, weights, strict=True))
    assert not search.model.training  # dropout off in the gate step


def test_second_order_hypergradient_matches_exact_unrolled_autograd():
    """The DARTS finite-difference hypergradient against autograd through one unrolled SGD step, float64."""
    tok = tiny.tokenizer()
    torch.manual_seed(0)
    cfg = tiny.config("llama", len(tok), num_labels=2, pad_token_id=tok.pad_token_id)
    base = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").double()
    layout = find_blocks(base)
    selection = BlockSelection.all(layout.num_blocks)
    model = attach_lora(base, selection, selection.to_lora_config(layout, task_type="SEQ_CLS"), layout)
    _randomise_lora(model, 0.3)
    gen = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(4, len(tok), (6, 10), generator=gen)
        return Batch(ids, torch.ones_like(ids), torch.randint(0, 2, (6,), generator=gen))

    train, val = batch(), batch()

    def loss(m, b):
        return F.cross_entropy(m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.targets)

    search = BilevelLoop(model, layout, loss, lambda i: train, lambda j: val,
                           SearchSettings(hypergradient="second_order"), total_steps=1)
    with torch.no_grad():
        search.alpha.copy_(torch.tensor([0.3, -0.2, 0.5, -0.6], dtype=torch.float64))
    xi = 0.5

    search.lora_grad(train)
    weights = [p.detach().clone() for p in search.params]
    grads = [p.grad.clone() for p in search.params]
    search.gate_grad_second_order(train, [val], xi)
    approx = search.alpha.grad.clone()
    assert all(torch.equal(p, w) for p, w in zip(search.params, weights, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(search.params, grads, strict=True))

    model.eval()
    alpha = search.alpha.requires_grad_(True)
    w = {n: p.detach().clone().requires_grad_(True) for n, p in zip(search.names, search.params, strict=True)}
    train_loss = loss(lambda **kw: torch.func.functional_call(model, w, args=(), kwargs=kw), train)
    g_w = torch.autograd.grad(train_loss, list(w.values()), create_graph=True)
    unrolled = {n: t - xi * g for (n, t), g in zip(w.items(), g_w, strict=True)}
    val_loss = loss(lambda **kw: torch.func.functional_call(model, unrolled, args=(), kwargs=kw), val)
    exact = torch.autograd.grad(val_loss, alpha)[0]
    first_order_part = torch.autograd.grad(
        loss(lambda **kw: torch.func.functional_call(
            model, {n: t.detach() for n, t in unrolled.items()}, args=(), kwargs=kw), val), alpha)[0]

    assert _rel(approx, exact) < 1e-2
    assert _rel(first_order_part, exact) > 5e-2  # the second-order term matters at this xi


class ReadsOneFeature(nn.Module):
    """A block adding ``proj(x[feature])`` to the running prediction; `proj` starts at zero."""

    def __init__(self, feature: int) -> None:
        super().__init__()
        self.feature = feature
        self.proj = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(x[:, self.feature : self.feature + 1])


class PlantedModel(nn.Module):
    def __init__(self, features: list[int]) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.layers = nn.ModuleList(ReadsOneFeature(f) for f in features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 1)
        for block in self.body.layers:
            h = block(x, h)
        return h.squeeze(1)


GOOD, NUM_BLOCKS = (0, 3, 4), 6


def _planted_batch(seed: int, index: int, shifted: bool, n: int = 32) -> PointBatch:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * index + int(shifted))
    y = torch.randn(n, generator=gen)
    signal = y + torch.randn(n, generator=gen)
    spurious = 1.05 * torch.randn(n, generator=gen) if shifted else y + 0.3 * torch.randn(n, generator=gen)
    return PointBatch(torch.stack([signal, spurious], dim=1), y)


def _planted_search(seed: int, blocks=None, **settings) -> BilevelLoop:
    torch.manual_seed(seed)
    model = PlantedModel([0 if b in GOOD else 1 for b in range(NUM_BLOCKS)])
    layout = find_blocks(model)
    selection = BlockSelection(blocks or range(NUM_BLOCKS), NUM_BLOCKS)
    model = attach_lora(model, selection, selection.to_lora_config(layout, r=1, lora_alpha=1), layout)
    config = SearchSettings(**{"r": 1, "lora_alpha": 1, "lr": 0.05, "alpha_lr": 0.05, "batch_size": 32,
                               "steps": 60, "stop_when_stable": None, **settings})
    return BilevelLoop(
        model, layout, lambda m, b: ((m(b.x) - b.y) ** 2).mean(), lambda i: _planted_batch(seed, i, False),
        lambda j: _planted_batch(seed, j, True), config, total_steps=config.steps, seed=seed,
        identity={"model": "planted", "task": "shifted-regression"},
    )


def _val_loss_after_lora_only(blocks) -> float:
    search = _planted_search(0, blocks)
    for step in range(60):
        search.lora_step(_planted_batch(0, step, False))
    with torch.no_grad():
        return search.loss(search.model, _planted_batch(0, 999, True, n=4096)).item()


@pytest.mark.parametrize("hypergradient", ["first_order", "second_order"])
def test_search_finds_the_planted_helpful_blocks(hypergradient):
    """Ground truth planted by a train/validation shift.

    The target is y ~ N(0, 1) and each input has two features: a noisy but honest signal s = y + N(0, 1), and
    a spurious z that equals y (+ 0.3 noise) in training but is independent noise in validation. Each block
    of a purpose-built 6-block residual model adds ``proj(feature)`` to the prediction, with ``proj`` zero
    (so the pretrained model predicts 0, validation loss 1) and LoRA on every ``proj``. Blocks 0, 3 and 4
    read s, the others read z. Training fits both (z is the better training feature), so LoRA on the
    z-blocks memorises a feature that does not transfer and raises the validation loss, while LoRA on the
    s-blocks lowers it (checked first, without gates). The real search loop (gates on lora_B, AdamW / Adam
    alternation, selection rule) must keep exactly the s-blocks in at least 4 of 5 seeds.
    """
    helpful, harmful = _val_loss_after_lora_only(GOOD), _val_loss_after_lora_only([1, 2, 5])
    assert helpful < 0.9 < 1.1 < harmful

    hits = 0
    for seed in range(5):
        result = _planted_search(seed, hypergradient=hypergradient).run()
        assert result.hypergradient == hypergradient and result.steps == 60
        hits += result.blocks == GOOD
    assert hits >= 4


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_search(tiny_llama_dir, task, tmp_path):
    kwargs = dict(seed=2, steps=7, lr=1e-2, alpha_lr=0.05, report_every=3, record_every=1, stop_when_stable=None)
    seen = []
    full = ft.search_layers(str(tiny_llama_dir), task, on_step=lambda m, s: seen.append(m), **kwargs)
    assert [m["step"] for m in seen] == [3, 6, 7]
    for key in ("step", "search_val_loss", "compute_s", "num_blocks", "blocks", "alpha"):
        assert key in seen[-1]
    assert seen[-1]["alpha"] == full.alpha and seen[-1]["blocks"] == list(full.blocks)

    with pytest.raises(tiny.Preempted):
        ft.search_layers(str(tiny_llama_dir), task, on_step=tiny.save_then_preempt(tmp_path / "ckpt"), **kwargs)
    assert (tmp_path / "ckpt" / STATE_FILE).exists()
    resumed = ft.search_layers(str(tiny_llama_dir), task, resume_from=tmp_path / "ckpt", **kwargs)
    assert resumed.alpha == full.alpha and resumed.blocks == full.blocks
    assert resumed.alpha_trajectory == full.alpha_trajectory and resumed.val_loss_curve == full.val_loss_curve
    assert resumed.steps == full.steps == 7 and resumed.examples_seen == full.examples_seen == 56


def test_selection_result_round_trips_and_exports_a_lora_config(tiny_llama_dir, task):
    result = ft.search_layers(str(tiny_llama_dir), task, seed=0, steps=3, lr=1e-2, rule="top_k", top_k=2)
    assert isinstance(result, ft.SelectionResult) and isinstance(result, SelectionResult)
    assert len(result.blocks) == 2 and list(result.blocks) == sorted(result.blocks)
    assert len(result.alpha) == len(result.gates) == result.num_blocks_total == 4
    assert math.isclose(sum(result.gates), 4, rel_tol=1e-6)
    assert result.rule == "top_k" and result.hypergradient == "first_order" and result.seed == 0
    assert result.threshold == min(result.alpha[b] for b in result.blocks)
    assert result.compute_s > 0 and result.examples_seen == 24 and result.task == task.spec.name
    assert len(result.val_loss_curve) == 3 and result.trajectory_steps == [1, 2, 3]

    again = SelectionResult.from_json(result.to_json())
    assert again == result and again.to_dict() == result.to_dict()
    with pytest.raises(ValueError, match="SelectionResult"):
        SelectionResult.from_json('{"blocks": [1]}')

    config = result.to_lora_config()
    assert config.layers_to_transform == list(result.blocks) and config.layers_pattern == "layers"
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.r == 8
    assert result.to_lora_config(r=4).r == 4
    assert result.selection == BlockSelection(result.blocks, 4)
    base, _ = load_model(str(tiny_llama_dir), "classification", num_labels=2)
    attach_lora(base, result.selection, config, find_blocks(base))  # raises unless LoRA lands on exactly them


def test_selection_rules_and_guard_rails():
    alpha = [0.3, -0.1, 0.5, -0.4, 0.1, 0.0]
    assert select_blocks(alpha) == ((0, 2, 4), pytest.approx(sum(alpha) / 6))
    shifted = [a + 7.0 for a in alpha]  # Adam can move the mean: compare against it, not against 0
    assert select_blocks(shifted)[0] == (0, 2, 4)
    assert select_blocks(alpha, "top_k", top_k=2) == ((0, 2), 0.3)
    assert select_blocks(alpha, max_blocks=2)[0] == (0, 2)
    assert select_blocks(alpha, min_blocks=5)[0] == (0, 1, 2, 4, 5)
    assert select_blocks([0.0] * 4) == ((0,), 0.0)  # all equal: nothing above the mean, never empty
    assert select_blocks([0.0] * 4, min_blocks=2)[0] == (0, 1)
    with pytest.raises(ValueError, match="top_k"):
        select_blocks(alpha, "top_k", top_k=7)
    with pytest.raises(ValueError, match="min_blocks"):
        select_blocks(alpha, min_blocks=7)


def test_search_settings_are_validated():
    with pytest.raises(TypeError, match="unknown setting"):
        ft.search_layers("unused", "unused", stepz=3)
    for bad in (dict(hypergradient="third_order"), dict(rule="median"), dict(rule="top_k"), dict(steps=0),
                dict(min_blocks=3, max_blocks=2), dict(alpha_lr=0), dict(rule="top_k", top_k=5, max_blocks=3)):
        with pytest.raises(ValueError):
            SearchSettings(**bad)
    with pytest.raises(ValueError, match="top_k=9"):
        _planted_search(0, rule="top_k", top_k=9)


def test_stable_selection_stops_the_search_and_says_why():
    result = _planted_search(0, steps=200, stop_when_stable=15).run()
    assert result.steps < result.planned_steps == 200 and "unchanged for 15 steps" in result.stop_reason
    assert result.blocks == GOOD and result.trajectory_steps[-1] == result.steps


def test_a_stopped_search_is_exactly_the_start_of_the_full_search():
    full = _planted_search(1, steps=60, record_every=1).run()
    stopped = _planted_search(1, steps=60, record_every=1, stop_when_stable=5).run()
    assert stopped.steps < 60 and stopped.stop_reason.startswith("stable")
    assert stopped.alpha == full.alpha_trajectory[stopped.steps - 1]
    assert stopped.val_loss_curve == full.val_loss_curve[: stopped.steps]


def test_stopping_also_waits_for_alphas_ranking_to_settle():
    quick = _planted_search(1, steps=60, stop_when_stable=5, stable_rank_corr=-1.0).run()
    settled = _planted_search(1, steps=60, stop_when_stable=5, stable_rank_corr=0.99).run()
    assert quick.steps < settled.steps
    rho = float(re.search(r"rank correlation with step \d+ is ([\d.]+)", settled.stop_reason).group(1))
    assert rho >= 0.99


def test_rank_correlation_is_spearmans_rho_with_tied_ranks():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert rank_correlation([0, 0, 0], [1, 2, 3]) == 0.0


def test_default_search_length_keeps_the_reference_proportion_to_the_fine_tune():
    search = SearchSettings()
    reference = default_search_steps(20_000, search, FinetuneSettings())
    assert reference == 625 and planned_steps(20_000, FinetuneSettings()) == 12 * reference
    assert default_search_steps(1_500, search) == 188  # no fine-tune given: one pass over the search set
    assert default_search_steps(1_500, search, FinetuneSettings(max_steps=30)) == round(188 * 30 / 564)
    small = FinetuneSettings(max_train_examples=128, epochs=5)
    assert search_set_size(1_500, search, small) == 128 and default_search_steps(1_500, search, small) == 16
    assert default_search_steps(1_500, SearchSettings(steps=7), small) == 16  # `steps` is applied by the search


def test_a_search_sized_against_its_fine_tune_and_cut_to_the_search_length(tiny_llama_dir, task):
    tune = FinetuneSettings(max_train_examples=24, epochs=2, batch_size=8)
    with pytest.warns(UserWarning, match="only 3 steps"):
        search = prepare_search(str(tiny_llama_dir), task, seed=0, finetune=tune, search_max_length=8)
    assert search.total_steps == 3
    assert search.train_batch(0).input_ids.shape[-1] <= 8 and search.val_batch(0).input_ids.shape[-1] <= 8
    assert prepare_search(str(tiny_llama_dir), task, seed=0, steps=2).total_steps == 2


def test_non_finite_values_stop_the_search_naming_the_step(tiny_llama_dir, task):
    with pytest.raises(FloatingPointError, match=r"at search step \d+ .*lr=1e\+30.*float32"):
        ft.search_layers(str(tiny_llama_dir), task, seed=0, steps=6, lr=1e30)
    search = _planted_search(0, steps=10)
    clean = search.train_batch
    search.train_batch = lambda i: PointBatch(clean(i).x, clean(i).y * (math.nan if i == 4 else 1.0))
    with pytest.raises(FloatingPointError, match="training loss became nan at search step 5"):
        search.run()


def test_pipeline_fine_tunes_fresh_lora_on_the_selected_blocks_only(tiny_llama_dir, task):
    tune = dict(max_steps=2, lr=1e-2)
    result = ft.run_pipeline(str(tiny_llama_dir), task, seed=0, search=dict(steps=3, lr=1e-2, r=4), finetune=tune)
    assert result.finetune.blocks == list(result.search.blocks)
    # Fresh LoRA: the fine-tune equals one started from the pretrained model with nothing from the search.
    direct = ft.finetune(str(tiny_llama_dir), task, blocks=result.search.blocks, seed=0, r=4, **tune)
    assert (direct.train_loss, direct.val_loss, direct.trainable_params) == (
        result.finetune.train_loss, result.finetune.val_loss, result.finetune.trainable_params)
    assert result.compute_s == pytest.approx(result.search.compute_s + result.finetune.compute_s)
