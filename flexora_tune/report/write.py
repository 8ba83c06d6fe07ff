"""`write_report`: a results folder's ``trials.csv`` in, the summary tables, plots and exported winner out."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..blocks import BlockSelection
from ..floors import read_floors
from ..results import (
    BEST_SO_FAR_FILE,
    BLOCK_MAP_FILE,
    BLOCK_SCORES_FILE,
    DEFAULT_METRIC,
    GATES_HEATMAP_FILE,
    META_FILE,
    SUMMARY_CSV_FILE,
    SUMMARY_MD_FILE,
    TRAJECTORIES_FILE,
    Mode,
    check_metric_mode,
    infer_mode,
)
from .agreement import agreement_lines, agreement_note, search_agreements, write_agreement
from .block_scores import plot_block_scores
from .compute import UNIT_FROM_ALL, finetune_units, has_flops, units_note
from .export import export_best
from .floor_rows import floor_warning
from .formatting import reference_missing, summary_document
from .paired import DEFAULT_REFERENCE
from .plots import plot_best_so_far, plot_block_map, plot_gate_heatmap
from .tables import NoSuccessfulTrialError, best_selection, summarize
from .trials import read_trials, validate_trials


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    with path.open() as fh:
        return json.load(fh)


def _check_units(trials: pd.DataFrame) -> None:
    """Warn when some seed's fine-tune equivalent is not an ``all`` fine-tune (see `finetune_units`)."""
    if not has_flops(trials):
        return
    units = finetune_units(trials)
    others = units.loc[units["unit_source"] != UNIT_FROM_ALL, "seed"]
    if len(others):
        warnings.warn(f"no finished 'all' fine-tune for seed(s) {', '.join(map(str, others))}: fine-tune "
                      "equivalents there are relative to the largest finished fine-tune (see summary.md)",
                      stacklevel=3)


def write_report(
    out_dir: str | Path, metric: str | None = None, reference: str | None = None, mode: Mode | None = None
) -> dict[str, Path]:
    """Turn a results folder's ``trials.csv`` into the summary, the plots and the exported best selection.

    Reads ``trials.csv`` and, when present, ``search_trajectories.json`` and ``meta.json``. `metric` defaults
    to meta's ``"metric"``, else ``val_accuracy``; it must be a validation metric (``val_*``) column of the
    table, else a `ValueError` naming the valid choices is raised before anything is written. Writes
    ``summary.csv``, ``summary.md``, ``best_so_far.png``, ``block_map.png``, ``gates_heatmap.png`` (only with
    trajectories), ``block_scores.png`` (only when search or probe trials have per-block scores, their final
    alpha or ``probe_scores``: `block_scores.plot_block_scores`; else a stale one is removed),
    ``best_selection.json`` and ``best_lora_config/adapter_config.json`` (only when some fine-tune succeeded;
    target modules and layers pattern from meta, else q_proj/v_proj and "layers" with a warning). Returns the
    paths written, keyed by artefact name. `mode` defaults to meta's ``"mode"`` when meta's metric is the one
    used, else to ``min`` for losses and ``max`` otherwise.

    `reference` (default: meta's ``"reference"``, else ``all``) is the strategy every other one is compared with,
    seed by seed, in the summary's paired columns; a reference that was not run is said in the summary (and
    warned about), not an error. With a ``flops`` column the summary and the best-so-far plot also give compute
    in fine-tune equivalents.

    With ``floors.json`` (written by `compare`: `floors.write_floors`), the summary ends with the floors as
    reference rows, the best-so-far plot draws them, strategies that do not beat the majority-class floor are
    marked, and best_selection.json records whether the winner beats it (and the warning when no strategy does).

    When a strategy has finished searches on two or more seeds (Flexora), their agreement against random subsets
    (`agreement.search_agreements`) is written to ``search_agreement.json`` (not among the returned paths), said
    in ``summary.md`` and printed as one line per strategy.
    """
    out = Path(out_dir)
    trials = read_trials(out)
    meta = _read_json(out / META_FILE) or {}
    trajectories = _read_json(out / TRAJECTORIES_FILE)
    metric = metric or meta.get("metric") or DEFAULT_METRIC
    validate_trials(trials, metric)
    if mode is None:
        mode = meta.get("mode") if meta.get("metric") == metric and meta.get("mode") else infer_mode(metric)
    check_metric_mode(metric, mode)
    reference = reference or meta.get("reference") or DEFAULT_REFERENCE
    floors = read_floors(out)
    summary = summarize(trials, metric, mode, reference, floors)
    if reference_missing(summary):
        warnings.warn(f"reference strategy {reference!r} is not in the trials table: no paired verdicts",
                      stacklevel=2)
    _check_units(trials)
    paths: dict[str, Path] = {"summary_csv": out / SUMMARY_CSV_FILE}
    summary.to_csv(paths["summary_csv"], index=False)
    paths["best_so_far"] = plot_best_so_far(trials, out / BEST_SO_FAR_FILE, metric, mode,
                                            floors.values(metric) if floors is not None else None)
    if trajectories:
        heatmap = plot_gate_heatmap(trajectories, out / GATES_HEATMAP_FILE)
        if heatmap is not None:
            paths["gates_heatmap"] = heatmap
    paths["block_map"] = plot_block_map(trials, out / BLOCK_MAP_FILE, metric, mode)
    scores = plot_block_scores(trials, out / BLOCK_SCORES_FILE)
    if scores is not None:
        paths["block_scores"] = scores
    else:
        (out / BLOCK_SCORES_FILE).unlink(missing_ok=True)  # a stale figure would show trials no longer in the table
    try:
        best: tuple[BlockSelection, pd.Series] | None = best_selection(trials, metric, mode)
    except NoSuccessfulTrialError as exc:
        warnings.warn(f"{exc}; best_selection.json and best_lora_config not written", stacklevel=2)
        best = None
    if best is not None:
        paths.update(export_best(*best, out, metric, meta, floors, mode, floor_warning(summary, metric)))
    agreements = search_agreements(trials)
    write_agreement(agreements, out, trials)
    for line in agreement_lines(agreements):
        print(f"[report] {line}", flush=True)
    images = [p.name for key, p in paths.items() if p.suffix == ".png"]
    paths["summary_md"] = out / SUMMARY_MD_FILE
    paths["summary_md"].write_text(summary_document(
        summary, metric, meta, best, images, notes=[n for n in (units_note(trials), agreement_note(agreements)) if n]
    ))
    return paths
