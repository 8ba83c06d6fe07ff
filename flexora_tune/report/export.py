"""The exported winner: ``best_selection.json`` (the blocks, where they came from and their scores) and
``best_lora_config/adapter_config.json`` (a peft LoRA config on exactly those blocks, ready to train)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..blocks import BlockSelection
from ..floors import Floors
from ..results import BEATS_MAJORITY_CLASS, BEST_LORA_CONFIG_DIR, BEST_SELECTION_FILE, META_FILE, Mode, infer_mode
from .floor_rows import beats
from .trials import paired_test_metric

#: Used for best_lora_config (with a warning) when meta.json does not name the model's LoRA targets.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")
DEFAULT_LAYERS_PATTERN = "layers"


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA:
        return None
    return value


def export_best(
    selection: BlockSelection, row: pd.Series, out: Path, metric: str, meta: Mapping[str, Any],
    floors: Floors | None = None, mode: Mode | None = None, warning: str | None = None,
) -> dict[str, Path]:
    """Write best_selection.json and best_lora_config/adapter_config.json for the winning trial `row`.

    With `floors`, best_selection.json also holds the majority-class floor's values (``majority_class``) and
    whether the winner's `metric` beats it (``beats_majority_class``, in `mode`'s direction); `warning` (no
    strategy beats the floor) is kept as ``floor_warning``.

    LoRA targets and layers pattern come from `meta` (meta.json); without them the defaults are used and a
    warning says so. Returns the paths written, keyed ``"best_selection"`` / ``"best_lora_config"``.
    """
    test_metric = paired_test_metric(metric)
    record = {
        **selection.to_dict(),
        "strategy": str(row["strategy"]),
        "seed": _json_value(row["seed"]),
        "trial_id": str(row["trial_id"]),
        "metric": metric,
        metric: _json_value(float(row[metric])),
        test_metric: _json_value(pd.to_numeric(row.get(test_metric, np.nan), errors="coerce")),
        "compute_s": _json_value(pd.to_numeric(row.get("compute_s"), errors="coerce")),
    }
    majority = floors.majority if floors is not None else None
    if majority is not None and majority.value(metric) is not None:
        record["majority_class"] = {key: _json_value(value) for key, value in majority.values.items()}
        record[BEATS_MAJORITY_CLASS] = beats(record[metric], majority.value(metric), mode or infer_mode(metric))
    if warning:
        record["floor_warning"] = warning
    selection_path = out / BEST_SELECTION_FILE
    selection_path.write_text(json.dumps(record, indent=2) + "\n")
    target_modules = meta.get("target_modules")
    layers_pattern = meta.get("layers_pattern")
    if not target_modules or not layers_pattern:
        target_modules = target_modules or list(DEFAULT_TARGET_MODULES)
        layers_pattern = layers_pattern or DEFAULT_LAYERS_PATTERN
        warnings.warn(
            f"{out / META_FILE} does not give target_modules and layers_pattern; best_lora_config uses "
            f"target_modules={list(target_modules)} and layers_pattern={layers_pattern!r}. Check they match "
            "your model before loading the adapter config.",
            stacklevel=3,
        )
    config_dir = out / BEST_LORA_CONFIG_DIR
    selection.to_lora_config(target_modules=list(target_modules), layers_pattern=layers_pattern).save_pretrained(
        str(config_dir)
    )
    return {"best_selection": selection_path, "best_lora_config": config_dir / "adapter_config.json"}
