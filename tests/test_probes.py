"""The importance probes (lora-norm, grad-norm): planted ground truth, the documented quantities, determinism,
Flexora's search set and length, the result's JSON, and the trainable's probe stage (no Ray session)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from tiny import PointBatch
from torch import nn

from flexora_tune.blocks import BlockSelection, attach_lora, find_blocks, rank_blocks, top_k_blocks
from flexora_tune.flexora import prepare_search
from flexora_tune.flops import batch_tokens
from flexora_tune.probes import (
    PROBES,
    BlockProbe,
    ProbeResult,
    ProbeSettings,
    grad_norm_ranking,
    lora_norm_ranking,
    open_probe,
    run_probe,
)
from flexora_tune.tasks import load_task
from flexora_tune.tune_trainable import parse_config

NUM_BLOCKS, WIDTH, GOOD = 6, 8, (0, 3, 4)


@pytest.fixture(scope="module")
def task(tiny_csv):
    return load_task({"source": str(tiny_csv), "max_length": 32})


class ReadsGroup(nn.Module):
    """A block adding ``proj(x[:, group])`` (WIDTH features -> 1) to the running prediction; `proj` starts at 0."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = group
        self.proj = nn.Linear(WIDTH, 1, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(x[:, self.group])


class PlantedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.layers = nn.ModuleList(ReadsGroup(b) for b in range(NUM_BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 1)
        for block in self.body.layers:
            h = block(x, h)
        return h.squeeze(1)


DIRECTIONS = nn.functional.normalize(torch.randn(NUM_BLOCKS, WIDTH, generator=torch.Generator().manual_seed(7)), dim=1)


def planted_batch(good: tuple[int, ...], seed: int, index: int, val: bool = False, n: int = 32) -> PointBatch:
    """Block b reads its own group of WIDTH features: ``c * u_b + N(0, 0.25 I)`` with u_b a fixed unit direction,
    c = y (the target) for the planted blocks `good` and c ~ N(0, 1) independent of y for the others, so every
    group has the same distribution and only the planted ones carry the signal."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * index + int(val))
    y = torch.randn(n, generator=gen)
    x = 0.5 * torch.randn(n, NUM_BLOCKS, WIDTH, generator=gen)
    for b in range(NUM_BLOCKS):
        c = y if b in good else torch.randn(n, generator=gen)
        x[:, b] += c[:, None] * DIRECTIONS[b]
    return PointBatch(x, y)


def planted_probe(seed: int, good: tuple[int, ...] = GOOD, **settings) -> BlockProbe:
    torch.manual_seed(seed)
    model = PlantedModel()
    layout = find_blocks(model)
    selection = BlockSelection.all(NUM_BLOCKS)
    model = attach_lora(model, selection, selection.to_lora_config(layout, r=4, lora_alpha=4), layout)
    config = ProbeSettings(**{"r": 4, "lora_alpha": 4, "lr": 0.02, "batch_size": 32, **settings})
    return BlockProbe(model, layout, lambda m, b: ((m(b.x) - b.y) ** 2).mean(),
                      lambda i: planted_batch(good, seed, i), lambda j: planted_batch(good, seed, j, val=True),
                      config, total_steps=40, seed=seed, val_pass_batches=4, identity={"model": "planted"})


def margin(result: ProbeResult, good: tuple[int, ...]) -> float:
    return min(result.scores[b] for b in good) / max(s for b, s in enumerate(result.scores) if b not in good)


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("good", [GOOD, (1, 2, 5)])
def test_each_probe_ranks_the_planted_blocks_first(probe, good):
    """Ground truth planted in the data: a 6-block residual model whose block b adds ``proj_b(x_b)`` to the
    prediction of y (``proj`` zero: the pretrained model predicts 0), LoRA (r 4) on every ``proj``. Every block's
    input group has the same distribution, but only the planted blocks' inputs carry y; the others carry a
    same-sized independent signal. Both probes must rank exactly the planted blocks first, with top_k=3 keep
    them, and score the weakest planted block over 1.5 times the strongest other, in every one of 5 seeds; a
    second planted set rules out a positional bias."""
    for seed in range(5):
        result = planted_probe(seed, good, top_k=3).run(probe)
        assert set(result.ranking[:3]) == set(good) and result.blocks == good
        assert margin(result, good) > 1.5, (seed, result.scores)


def test_the_scores_are_the_documented_quantities():
    """lora-norm: the mean over scoring examples of |scaling * B A x| per block (one adapted module per block);
    grad-norm: the norm of the mean training loss's gradient w.r.t. A and B, where A's is exactly zero at init."""
    probe = planted_probe(0)
    result = probe.lora_norm()
    assert result.steps == 40 and result.examples_seen == 40 * 32 and result.val_examples_seen == 4 * 32
    root = probe.model.get_base_model()
    with torch.no_grad():
        for b, layer in enumerate(root.body.layers):
            proj = layer.proj
            a, bb, scale = proj.lora_A["default"].weight, proj.lora_B["default"].weight, proj.scaling["default"]
            deltas = [scale * planted_batch(GOOD, 0, j, val=True).x[:, b] @ a.T @ bb.T for j in range(4)]
            assert result.scores[b] == pytest.approx(torch.cat(deltas).abs().mean().item(), rel=1e-5)

    probe = planted_probe(1)
    result = probe.grad_norm()
    assert result.steps == 8 and result.examples_seen == 8 * 32 and result.val_examples_seen == 0
    root = probe.model.get_base_model()
    loss = sum(probe.loss(probe.model, planted_batch(GOOD, 1, j)) for j in range(8)) / 8
    for b, layer in enumerate(root.body.layers):
        a, bb = layer.proj.lora_A["default"].weight, layer.proj.lora_B["default"].weight
        grad_a, grad_b = torch.autograd.grad(loss, [a, bb], retain_graph=True)
        assert torch.count_nonzero(grad_a) == 0 and torch.count_nonzero(bb) == 0  # B is zero, untouched
        assert result.scores[b] == pytest.approx(grad_b.norm().item(), rel=1e-5)
    assert all(p.grad is None for p in probe.params)


def test_probes_are_deterministic_for_a_seed(tiny_llama_dir, task):
    for probe in PROBES:
        first, again = planted_probe(2).run(probe), planted_probe(2).run(probe)
        assert first.scores == again.scores and first.ranking == again.ranking
        assert planted_probe(3).run(probe).scores != first.scores
    kwargs = dict(steps=4, lr=1e-2, grad_batches=2)
    for rank in (lora_norm_ranking, grad_norm_ranking):
        first, again = rank(str(tiny_llama_dir), task, 1, **kwargs), rank(str(tiny_llama_dir), task, 1, **kwargs)
        assert first.scores == again.scores and first.blocks == again.blocks
        assert rank(str(tiny_llama_dir), task, 2, **kwargs).scores != first.scores


def test_a_probe_uses_flexoras_search_set_batches_lora_and_default_length(tiny_llama_dir, task):
    """Sized against the same fine-tune (no `steps`), lora-norm trains exactly the steps Flexora's default search
    would, on the same batches from the same seeded LoRA, and counts its FLOPs on the search's axis."""
    tune = {"max_steps": 30}  # one pass over 120 examples is 15 steps; the search's share of 30 of 45: 10
    search = prepare_search(str(tiny_llama_dir), task, seed=3, finetune=tune)
    probe = open_probe(str(tiny_llama_dir), task, seed=3, finetune=tune)
    assert probe.total_steps == search.total_steps == 10
    for i in (0, 9, 15):
        assert torch.equal(probe.train_batch(i).input_ids, search.train_batch(i).input_ids)
        assert torch.equal(probe.val_batch(i).input_ids, search.val_batch(i).input_ids)
    lora = {n: p for n, p in probe.model.named_parameters() if "lora_A" in n}
    assert lora and all(torch.equal(p, dict(search.model.named_parameters())[n]) for n, p in lora.items())

    expected = sum(probe.flop_model.train_step(batch_tokens(probe.train_batch(i))) for i in range(10))
    expected += sum(probe.flop_model.forward(batch_tokens(probe.val_batch(j))) for j in range(3))
    result = probe.lora_norm()
    assert (result.steps, result.examples_seen, result.val_examples_seen) == (10, 80, 24)  # 20 search_val: 3 batches
    assert result.flops == expected and result.compute_s > 0
    assert result.train_loss is not None and result.search_val_loss is not None

    grad = open_probe(str(tiny_llama_dir), task, seed=3, finetune=tune, grad_batches=4)
    expected = sum(grad.flop_model.train_step(batch_tokens(grad.train_batch(i))) for i in range(4))
    result = grad.grad_norm()
    assert (result.steps, result.examples_seen, result.flops) == (4, 32, expected)
    assert open_probe(str(tiny_llama_dir), task, grad_batches=100).grad_batches == 15  # one pass at most


def test_probe_result_rules_json_and_lora_config(tiny_llama_dir, task):
    result = grad_norm_ranking(str(tiny_llama_dir), task, 0, top_k=2, grad_batches=2)
    assert result.rule == "top_k" and result.blocks == top_k_blocks(result.scores, 2)
    assert result.ranking == rank_blocks(result.scores) and result.threshold == result.scores[result.ranking[1]]
    assert result.probe == "grad-norm" and result.num_blocks_total == 4 and result.task == task.spec.name
    again = ProbeResult.from_json(result.to_json())
    assert again == result and again.to_dict() == result.to_dict()
    config = result.to_lora_config()
    assert config.layers_to_transform == list(result.blocks) and set(config.target_modules) == {"q_proj", "v_proj"}

    default = grad_norm_ranking(str(tiny_llama_dir), task, 0, grad_batches=2)
    mean = math.fsum(default.scores) / 4
    assert default.rule == "mean" and default.blocks == tuple(b for b in range(4) if default.scores[b] > mean)
    with pytest.raises(ValueError, match="ProbeResult"):
        ProbeResult.from_json('{"probe": "grad-norm"}')
    with pytest.raises(ValueError, match="probe must be one of"):
        run_probe("act-norm", "never-loaded")
    with pytest.raises(TypeError, match="unknown setting"):
        lora_norm_ranking("never-loaded", task, grad_batchez=2)
    with pytest.raises(ValueError, match="grad_batches"):
        ProbeSettings(grad_batches=0)


def test_the_trainable_parses_a_probe_trial():
    config = {"stage": "probe", "probe": "grad-norm", "top_k": 2, "steps": 5, "epochs": 2, "grad_batches": 3,
              "search": {"lr": 5e-3}, "finetune": {"max_steps": 4}}
    trial = parse_config(config)
    assert (trial.stage, trial.probe, trial.label) == ("probe", "grad-norm", "grad-norm")
    assert dict(trial.settings) == {"top_k": 2, "steps": 5, "grad_batches": 3, "lr": 5e-3}
    assert dict(trial.finetune_settings) == {"epochs": 2, "max_steps": 4}  # what the probe is sized against
    assert parse_config({**config, "strategy": "lora-probe"}).label == "lora-probe"
    shared = {"steps": 5, "grad_batches": 3, "score_batches": 2, "epochs": 2}  # one base config for every stage
    assert dict(parse_config(shared).settings) == {"epochs": 2}
    assert dict(parse_config({**shared, "stage": "search"}).settings) == {"steps": 5}
    with pytest.raises(ValueError, match="needs config\\['probe'\\]"):
        parse_config({"stage": "probe"})
    with pytest.raises(ValueError, match="needs config\\['probe'\\]"):
        parse_config({"stage": "probe", "probe": "act-norm"})
    with pytest.raises(ValueError, match="chooses its own blocks"):
        parse_config({"stage": "probe", "probe": "lora-norm", "blocks": [0]})
    with pytest.raises(ValueError, match="'probe'"):
        parse_config({"stage": "probes"})


def test_the_probes_import_no_ray():
    code = "import sys, flexora_tune.probes; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
