"""Results of a strategy comparison: the summary table, the plots and the exported best selection.

A results folder holds ``trials.csv`` (one row per trial; ``flexora-tune compare`` writes it, or
`write_trials`), optionally ``search_trajectories.json`` (Flexora's alpha per recorded search step) and
``meta.json`` (model, task, metric, reference, LoRA ``target_modules`` and ``layers_pattern``). `write_report` turns
it into ``summary.csv`` / ``summary.md``, the PNG plots, ``best_selection.json`` and
``best_lora_config/adapter_config.json``.

One job per module: `trials` (the table, read, written and checked), `tables` (summaries and the winner),
`paired` (each strategy against a reference, seed by seed, with `stats`' Student t intervals), `floor_rows`
(the comparison's floors as reference rows, the marks and the warning when no strategy beats them), `compute`
(FLOPs in fine-tune equivalents), `agreement` (whether the searches of different seeds agree beyond chance),
`formatting` (text and Markdown), `plots`, `block_scores` (searches' final alpha and probes' scores per block, as
ranks), `export` (the winner's files) and `write` (all of it for a folder).
File names and metric keys live in `flexora_tune.results`; they are re-exported here for callers that imported
them from this module.

The selection rule, everywhere: trials are compared by the *validation* metric only (ties: less compute).
The test metric of the chosen trial is carried along and reported, never compared.
"""

from __future__ import annotations

from ..results import (
    BEST_LORA_CONFIG_DIR,
    BEST_SELECTION_FILE,
    BEST_SO_FAR_FILE,
    BLOCK_MAP_FILE,
    BLOCK_SCORES_FILE,
    DEFAULT_METRIC,
    GATES_HEATMAP_FILE,
    META_FILE,
    SUMMARY_CSV_FILE,
    SUMMARY_MD_FILE,
    TRAJECTORIES_FILE,
    TRIALS_FILE,
    TRIALS_PARQUET_FILE,
    Mode,
    infer_mode,
)
from .agreement import agreement_lines, block_values, search_agreements
from .block_scores import BlockScores, block_score_rows, block_scores, plot_block_scores
from .compute import FLOPS_COLUMN, finetune_equivalents, finetune_units, has_flops
from .export import DEFAULT_LAYERS_PATTERN, DEFAULT_TARGET_MODULES, export_best
from .floor_rows import FLOOR_COLUMNS, floor_warning
from .formatting import format_markdown, format_summary, summary_document
from .paired import DEFAULT_REFERENCE, PAIRED_COLUMNS, paired_verdicts
from .plots import (
    best_so_far_axis,
    gates_from_alpha,
    plot_best_so_far,
    plot_block_map,
    plot_gate_heatmap,
    strategy_colors,
)
from .stats import mean_confidence_interval, student_t_cdf, student_t_quantile
from .tables import (
    FT_COLUMNS,
    PER_SEED_COLUMNS,
    SUMMARY_COLUMNS,
    NoSuccessfulTrialError,
    best_per_seed,
    best_selection,
    summarize,
)
from .trials import REQUIRED_COLUMNS, paired_test_metric, read_trials, validate_trials, validation_metrics, write_trials
from .write import write_report

__all__ = [
    "BEST_LORA_CONFIG_DIR",
    "BEST_SELECTION_FILE",
    "BEST_SO_FAR_FILE",
    "BLOCK_MAP_FILE",
    "BLOCK_SCORES_FILE",
    "BlockScores",
    "DEFAULT_LAYERS_PATTERN",
    "DEFAULT_METRIC",
    "DEFAULT_REFERENCE",
    "DEFAULT_TARGET_MODULES",
    "FLOOR_COLUMNS",
    "FLOPS_COLUMN",
    "FT_COLUMNS",
    "GATES_HEATMAP_FILE",
    "META_FILE",
    "PAIRED_COLUMNS",
    "PER_SEED_COLUMNS",
    "REQUIRED_COLUMNS",
    "SUMMARY_COLUMNS",
    "SUMMARY_CSV_FILE",
    "SUMMARY_MD_FILE",
    "TRAJECTORIES_FILE",
    "TRIALS_FILE",
    "TRIALS_PARQUET_FILE",
    "Mode",
    "NoSuccessfulTrialError",
    "agreement_lines",
    "best_per_seed",
    "block_score_rows",
    "block_scores",
    "block_values",
    "best_so_far_axis",
    "best_selection",
    "export_best",
    "finetune_equivalents",
    "finetune_units",
    "floor_warning",
    "format_markdown",
    "format_summary",
    "gates_from_alpha",
    "has_flops",
    "infer_mode",
    "mean_confidence_interval",
    "paired_test_metric",
    "paired_verdicts",
    "plot_best_so_far",
    "plot_block_map",
    "plot_block_scores",
    "plot_gate_heatmap",
    "read_trials",
    "search_agreements",
    "strategy_colors",
    "student_t_cdf",
    "student_t_quantile",
    "summarize",
    "summary_document",
    "validate_trials",
    "validation_metrics",
    "write_report",
    "write_trials",
]
