"""`write_report`: a results folder's ``trials.csv`` in, the summary tables, plots and exported winner out."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..blocks import BlockSelection
from ..results import (
    BEST_SO_FAR_FILE,
    BLOCK_MAP_FILE,
    DEFAULT_METRIC,
    GATES_HEATMAP_FILE,
    META_FILE,
    SUMMARY_CSV_FILE,
    SUMMARY_MD_FILE,
    TRAJECTORIES_FILE,
)
from .export import export_best
from .formatting import summary_document
from .plots import plot_best_so_far, plot_block_map, plot_gate_heatmap
from .tables import NoSuccessfulTrialError, best_selection, summarize
from .trials import read_trials, validate_trials


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    with path.open() as fh:
        return json.load(fh)


def write_report(out_dir: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Turn a results folder's ``trials.csv`` into the summary, the plots and the exported best selection.

    Reads ``trials.csv`` and, when present, ``search_trajectories.json`` and ``meta.json``. `metric` defaults
    to meta's ``"metric"``, else ``val_accuracy``; it must be a validation metric (``val_*``) column of the
    table, else a `ValueError` naming the valid choices is raised before anything is written. Writes
    ``summary.csv``, ``summary.md``, ``best_so_far.png``, ``block_map.png``, ``gates_heatmap.png`` (only with
    trajectories), ``best_selection.json`` and ``best_lora_config/adapter_config.json`` (only when some
    fine-tune succeeded; target modules and layers pattern from meta, else q_proj/v_proj and "layers" with a
    warning). Returns the paths written, keyed by artefact name.
    """
    out = Path(out_dir)
    trials = read_trials(out)
    meta = _read_json(out / META_FILE) or {}
    trajectories = _read_json(out / TRAJECTORIES_FILE)
    metric = metric or meta.get("metric") or DEFAULT_METRIC
    validate_trials(trials, metric)
    summary = summarize(trials, metric)
    paths: dict[str, Path] = {"summary_csv": out / SUMMARY_CSV_FILE}
    summary.to_csv(paths["summary_csv"], index=False)
    paths["best_so_far"] = plot_best_so_far(trials, out / BEST_SO_FAR_FILE, metric)
    if trajectories:
        heatmap = plot_gate_heatmap(trajectories, out / GATES_HEATMAP_FILE)
        if heatmap is not None:
            paths["gates_heatmap"] = heatmap
    paths["block_map"] = plot_block_map(trials, out / BLOCK_MAP_FILE, metric)
    try:
        best: tuple[BlockSelection, pd.Series] | None = best_selection(trials, metric)
    except NoSuccessfulTrialError as exc:
        warnings.warn(f"{exc}; best_selection.json and best_lora_config not written", stacklevel=2)
        best = None
    if best is not None:
        paths.update(export_best(*best, out, metric, meta))
    images = [p.name for key, p in paths.items() if p.suffix == ".png"]
    paths["summary_md"] = out / SUMMARY_MD_FILE
    paths["summary_md"].write_text(summary_document(summary, metric, meta, best, images))
    return paths
