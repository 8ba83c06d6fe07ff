"""Block discovery across families, the selection value type, and LoRA placement on exactly a selection."""

from __future__ import annotations

import json

import pytest
import tiny
from peft import LoraConfig, get_peft_model

from flexora_tune.blocks import (
    BlockSelection,
    LoraPlacementError,
    attach_lora,
    find_blocks,
    lora_placement,
    verify_lora_placement,
)

FAMILIES = {
    "llama": ("model.layers", 4, ("q_proj", "v_proj")),
    "mistral": ("model.layers", 3, ("q_proj", "v_proj")),
    "qwen2": ("model.layers", 3, ("q_proj", "v_proj")),
    "gpt2": ("transformer.h", 3, ("c_attn",)),
    "gpt_neox": ("gpt_neox.layers", 3, ("query_key_value",)),
    "bert": ("encoder.layer", 3, ("query", "value")),
    "distilbert": ("transformer.layer", 3, ("q_lin", "v_lin")),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_find_blocks_locates_each_family_and_its_attention_targets(family):
    layout = find_blocks(tiny.model(family))
    path, count, targets = FAMILIES[family]
    assert (layout.path, layout.num_blocks, layout.target_modules) == (path, count, targets)
    assert set(targets) <= set(layout.linear_modules)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_lands_on_exactly_the_selected_blocks(family):
    model = tiny.model(family)
    layout = find_blocks(model)
    selection = BlockSelection([0, layout.num_blocks - 1], layout.num_blocks)
    peft_model = attach_lora(model, selection, selection.to_lora_config(layout), layout)
    placed = lora_placement(peft_model, layout)
    assert placed == {b: set(layout.target_modules) for b in selection.blocks}
    lora_names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(lora_names) == len(selection) * len(layout.target_modules)


def test_placement_check_rejects_a_config_that_silently_matches_other_blocks():
    model = tiny.model("llama")
    layout = find_blocks(model)
    selection = BlockSelection([1], layout.num_blocks)
    wrong = LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[2], layers_pattern="layers")
    with pytest.raises(LoraPlacementError, match=r"on blocks \[2\] but the selection is \[1\]"):
        verify_lora_placement(get_peft_model(model, wrong), layout, selection, ["q_proj", "v_proj"])


def test_placement_check_rejects_missing_target_modules():
    model = tiny.model("llama")
    layout = find_blocks(model)
    selection = BlockSelection([0], layout.num_blocks)
    partial = LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers")
    with pytest.raises(LoraPlacementError, match="target modules"):
        verify_lora_placement(get_peft_model(model, partial), layout, selection, ["q_proj", "v_proj"])


def test_model_without_blocks_gets_a_clear_error():
    from torch import nn

    with pytest.raises(ValueError, match="No repeated transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_selection_sorts_and_rejects_bad_input():
    assert BlockSelection([3, 0, 2], 4).blocks == (0, 2, 3)
    with pytest.raises(ValueError, match="at least one block"):
        BlockSelection([], 4)
    with pytest.raises(ValueError, match=r"duplicate block indices \[2\]"):
        BlockSelection([2, 2], 4)
    with pytest.raises(ValueError, match=r"out of range.*0\.\.3"):
        BlockSelection([4], 4)
    with pytest.raises(ValueError, match="out of range"):
        BlockSelection([-1], 4)
    with pytest.raises(TypeError, match="must be ints"):
        BlockSelection([1.5], 4)
    with pytest.raises(ValueError, match="positive int"):
        BlockSelection([0], 0)


def test_selection_is_immutable_and_hashable():
    selection = BlockSelection([1, 2], 4)
    with pytest.raises(AttributeError):
        selection.blocks = (0,)
    assert {selection, BlockSelection([2, 1], 4)} == {selection}


def test_selection_round_trips_through_json_mask_and_lora_config():
    selection = BlockSelection([0, 3], 5)
    assert BlockSelection.from_json(selection.to_json()) == selection
    assert json.loads(selection.to_json()) == {"blocks": [0, 3], "num_blocks_total": 5}
    assert BlockSelection.from_mask(selection.mask) == selection
    config = selection.to_lora_config(target_modules=["q_proj"], layers_pattern="layers")
    assert config.layers_to_transform == [0, 3] and config.layers_pattern == "layers"
    assert BlockSelection.from_lora_config(config, 5) == selection
    assert BlockSelection.from_lora_config(LoraConfig(target_modules=["q_proj"]), 5) == BlockSelection.all(5)


def test_selection_from_malformed_json_names_the_expected_shape():
    with pytest.raises(ValueError, match="num_blocks_total"):
        BlockSelection.from_json('{"layers": [1]}')


def test_selection_for_another_model_size_is_rejected():
    layout = find_blocks(tiny.model("llama"))
    with pytest.raises(ValueError, match="selection is for 6 blocks but the model has 4"):
        BlockSelection([0], 6).to_lora_config(layout)
