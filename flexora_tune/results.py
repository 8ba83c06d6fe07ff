"""The results schema: metric keys, results-folder file names, and reading a search's selection back from a
Ray Tune result. The trainable writes these names, `compare` and `report` read them; nothing else defines them.

This module imports neither Ray nor torch, so a report can be written anywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from .blocks import parse_blocks

Mode = Literal["max", "min"]

# Metric keys a fine-tune trial reports. Search reports hold them only as placeholders (-inf, or +inf for a
# loss: the worst value, never a measurement) so that Tune's strict metric check and pandas' idxmax accept them.
VAL_ACCURACY = "val_accuracy"
VAL_LOSS = "val_loss"
TEST_ACCURACY = "test_accuracy"
TRAIN_LOSS = "train_loss"
FINETUNE_METRICS: tuple[str, ...] = (VAL_ACCURACY, VAL_LOSS, TEST_ACCURACY, TRAIN_LOSS)
#: Estimated training FLOPs of a trial so far (both stages): the compute axis that other load cannot move.
FLOPS = "flops"
#: The time attribute to give Tune schedulers (ASHA, MedianStoppingRule, HyperBand): a fine-tune's optimizer step
#: at each report, 0 in every search report, so a scheduler never places a search at a rung nor compares it.
FINETUNE_STEP = "finetune_step"
#: The config key (and, where the trainable echoes it, the result key) naming the arm of a comparison run as one
#: Tune experiment (`search.ArmsSearcher`): ``"<strategy>_seed<seed>"``, e.g. ``"random_seed0"``.
ARM = "arm"
#: The stage of a probe trial (`probes.py`), and the config and result key naming its probe (``"lora-norm"`` or
#: ``"grad-norm"``).
PROBE_STAGE = "probe"
PROBE_KEY = "probe"
#: A probe trial's final report: its score per block, and its ranking of the blocks (best first).
PROBE_SCORES = "probe_scores"
PROBE_RANKING = "probe_ranking"
# A search trial's own losses (its search namespace): mean over the steps since its previous report.
SEARCH_VAL_LOSS = "search_val_loss"
SEARCH_TRAIN_LOSS = "search_train_loss"
SEARCH_METRICS: tuple[str, ...] = (SEARCH_VAL_LOSS, SEARCH_TRAIN_LOSS)
#: How far a search's alpha has separated (`stability.alpha_separation`; about 1 is noise): a search report's key
#: and, where a trials table has it, a column of its search rows.
ALPHA_SEPARATION = "alpha_separation"
DEFAULT_METRIC = VAL_ACCURACY
#: Lower is better for a metric whose name contains one of these words.
MIN_WORDS: tuple[str, ...] = ("loss", "error", "perplexity", "ppl")
#: A floor's test loss (fine-tune trials report no test loss; `floors.json` does, where one is defined).
TEST_LOSS = "test_loss"
#: The floors of a comparison (`floors.py`): reference rows of its summary, never strategies.
MAJORITY_CLASS = "majority-class"
NO_FINE_TUNE = "no-fine-tune"
#: best_selection.json: whether the winner's validation metric beats the majority-class floor's.
BEATS_MAJORITY_CLASS = "beats_majority_class"

# Files inside a trial's checkpoint.
SELECTION_FILE = "selection.json"
#: A finished probe trial's `ProbeResult` (scores, ranking, kept blocks, cost).
PROBE_FILE = "probe.json"

# Files of a comparison's results folder.
TRIALS_FILE = "trials.csv"
TRIALS_PARQUET_FILE = "trials.parquet"
TRAJECTORIES_FILE = "search_trajectories.json"
META_FILE = "meta.json"
EXPERIMENTS_FILE = "finished_experiments.json"
SUMMARY_CSV_FILE = "summary.csv"
SUMMARY_MD_FILE = "summary.md"
BEST_SO_FAR_FILE = "best_so_far.png"
GATES_HEATMAP_FILE = "gates_heatmap.png"
BLOCK_MAP_FILE = "block_map.png"
#: Each search's final alpha and each probe's scores per block, as ranks averaged over seeds (`report.block_scores`).
BLOCK_SCORES_FILE = "block_scores.png"
BEST_SELECTION_FILE = "best_selection.json"
BEST_LORA_CONFIG_DIR = "best_lora_config"
#: The floors `compare` computes before any trial (majority-class and no-fine-tune, per split).
FLOORS_FILE = "floors.json"
#: How much the Flexora searches of the comparison's seeds agree, against random subsets (`report.agreement`).
SEARCH_AGREEMENT_FILE = "search_agreement.json"


def infer_mode(metric: str) -> Mode:
    """``min`` for losses and errors, ``max`` otherwise (accuracy, F1, ...)."""
    return "min" if any(word in metric.lower() for word in MIN_WORDS) else "max"


def check_metric_mode(metric: str, mode: str) -> None:
    """Raise when `mode` is not 'min'/'max' or `metric` is empty."""
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty metric name such as {DEFAULT_METRIC!r}, got {metric!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def trial_outcomes(analysis: Any) -> list[tuple[dict[str, Any], Any]]:
    """(last result, latest checkpoint) per trial of an `ExperimentAnalysis` (tune.run) or a `ResultGrid`
    (Tuner.fit)."""
    if hasattr(analysis, "trials"):
        return [(dict(t.last_result or {}), t.checkpoint) for t in analysis.trials]
    return [(dict(r.metrics or {}), r.checkpoint) for r in analysis]


def read_selection(checkpoint: Any) -> dict[str, Any] | None:
    """The `SelectionResult` fields a finished search trial saved in `checkpoint`, or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / SELECTION_FILE
        return json.loads(path.read_text()) if path.exists() else None


def best_search_selection(outcomes: Iterable[tuple[dict[str, Any], Any]], metric: str = DEFAULT_METRIC,
                          mode: Mode = "max") -> dict[str, Any]:
    """The saved selection (as a dict) of the search whose selection's fine-tune scored best on `metric` (a
    validation metric), or of the first search when none of its selections was fine-tuned."""
    check_metric_mode(metric, mode)
    searches: list[dict[str, Any]] = []
    scored: list[tuple[float, tuple[int, ...]]] = []
    finetune_keys: set[str] = set()
    for result, checkpoint in outcomes:
        if result.get("stage") == "search":
            saved = read_selection(checkpoint)
            if saved is not None:
                searches.append(saved)
        if result.get("stage") == "finetune":
            finetune_keys.update(result)
        value = result.get(metric)
        if result.get("stage") == "finetune" and isinstance(value, int | float) and math.isfinite(value):
            scored.append((value if mode == "max" else -value, parse_blocks(result.get("blocks")) or ()))
    if finetune_keys and metric not in finetune_keys:
        reported = sorted(k for k in finetune_keys if k in FINETUNE_METRICS)
        raise ValueError(f"metric {metric!r} is not reported by any fine-tune trial; use one of {reported}")
    if not searches:
        raise ValueError("no finished Flexora search trial in this analysis: run it with FlexoraSearcher "
                         "(or a trial config with stage='search')")
    for _, blocks in sorted(scored, key=lambda s: -s[0]):
        match = next((s for s in searches if tuple(s["blocks"]) == tuple(blocks)), None)
        if match is not None:
            return match
    return searches[0]
