"""The trials table: its required columns, reading and writing it, checking the metric that chooses, and the
normalised frame every summary and plot works on.

A metric that chooses a winner must be a validation metric (``val_*``): test results are reported, never
compared, and a training metric says nothing about held-out quality.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..blocks import parse_blocks
from ..results import DEFAULT_METRIC, TRIALS_FILE, TRIALS_PARQUET_FILE

#: Columns every trials table must have (the metric column is checked separately).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "trial_id", "strategy", "seed", "stage", "blocks", "num_blocks_total", "compute_s", "start_time", "status",
)
#: The Ray Tune status of a trial that raised; it counts in compute but never wins.
ERROR_STATUS = "ERROR"
VALIDATION_PREFIX = "val_"

_TEXT_COLUMNS = ("trial_id", "strategy", "stage", "status", "node", "blocks", "alpha")


def paired_test_metric(metric: str) -> str:
    """The reported-only counterpart of a validation metric: ``val_accuracy`` -> ``test_accuracy``."""
    return "test_" + metric[len(VALIDATION_PREFIX):] if metric.startswith(VALIDATION_PREFIX) else "test_" + metric


def validation_metrics(columns: Iterable[Any]) -> list[str]:
    """The columns that may choose a winner (validation metrics), sorted."""
    return sorted(str(c) for c in columns if str(c).startswith(VALIDATION_PREFIX))


def validate_trials(trials: pd.DataFrame, metric: str = DEFAULT_METRIC) -> None:
    """Raise a `ValueError` if `trials` lacks a required column or `metric` is not a usable validation metric.

    A test metric is refused as `metric` (test results are reported, never used to choose), and so is any
    other metric that is not a validation one (``train_loss``, ...): the message lists the valid choices.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in trials.columns]
    if missing:
        raise ValueError(
            f"trials table is missing required columns {missing}; it has {list(map(str, trials.columns))}. "
            f"Every trial row needs {list(REQUIRED_COLUMNS)} plus the metric column (e.g. {DEFAULT_METRIC!r})."
        )
    available = validation_metrics(trials.columns)
    if metric.startswith("test_"):
        raise ValueError(
            f"metric {metric!r} is a test metric: test results are reported only, never used to choose. "
            f"Choose by a validation metric: {available}"
        )
    if not metric.startswith(VALIDATION_PREFIX):
        raise ValueError(
            f"metric {metric!r} is not a validation metric: the winner is chosen by a validation metric only "
            f"(a name starting with {VALIDATION_PREFIX!r}). Valid choices in this table: {available}"
        )
    if metric not in trials.columns:
        raise ValueError(
            f"metric {metric!r} is not a column of the trials table; available metric columns: {available}"
        )


def _to_cell(value: Any) -> Any:
    """List-like cells as JSON text, so CSV and Parquet hold the same thing."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return json.dumps([v.item() if isinstance(v, np.generic) else v for v in value])
    return value


def write_trials(trials: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write `trials` to ``out_dir/trials.csv`` and, when pyarrow is importable, ``out_dir/trials.parquet``.

    List-valued cells (``blocks``, ``alpha``) are stored as JSON lists. Returns the paths written, keyed
    ``"trials_csv"`` / ``"trials_parquet"``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = trials.copy()
    for column in table.columns:
        if table[column].dtype == object:
            table[column] = table[column].map(_to_cell)
    paths = {"trials_csv": out / TRIALS_FILE}
    table.to_csv(paths["trials_csv"], index=False)
    if importlib.util.find_spec("pyarrow") is not None:
        try:
            table.to_parquet(out / TRIALS_PARQUET_FILE, index=False)
            paths["trials_parquet"] = out / TRIALS_PARQUET_FILE
        except (TypeError, ValueError, ImportError) as exc:  # pyarrow.ArrowException subclasses ValueError
            warnings.warn(f"trials.parquet not written ({exc}); trials.csv holds the same table", stacklevel=2)
    return paths


def read_trials(out_dir: str | Path) -> pd.DataFrame:
    """Read ``out_dir/trials.csv`` (text columns as text) and check its required columns."""
    path = Path(out_dir) / TRIALS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a results folder needs trials.csv (one row per trial), which "
            "`flexora-tune compare` writes (or flexora_tune.report.write_trials(df, folder))."
        )
    header = pd.read_csv(path, nrows=0).columns
    trials = pd.read_csv(path, dtype={c: "object" for c in _TEXT_COLUMNS if c in header}, keep_default_na=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in trials.columns]
    if missing:
        raise ValueError(f"{path} is missing required columns {missing}; it has {list(trials.columns)}")
    return trials


def prepare_trials(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A validated copy with normalised types and three helper columns: ``_test`` (the paired test metric),
    ``_blocks`` (parsed block tuples) and ``_order`` (the original row order)."""
    validate_trials(trials, metric)
    df = trials.reset_index(drop=True)
    df["trial_id"] = df["trial_id"].astype(str)
    df["strategy"] = df["strategy"].astype(str)
    df["stage"] = df["stage"].astype(str).str.strip().str.lower()
    df["status"] = df["status"].fillna("").astype(str).str.strip().str.upper()
    test_metric = paired_test_metric(metric)
    df["_test"] = pd.to_numeric(df[test_metric], errors="coerce") if test_metric in df.columns else np.nan
    for column in (metric, "compute_s", "start_time", "num_blocks_total"):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    df["_blocks"] = df["blocks"].map(parse_blocks)
    df["_order"] = np.arange(len(df))
    return df


def eligible(df: pd.DataFrame, metric: str) -> pd.Series:
    """Trials that may win: finished fine-tunes (not errored) with a finite value of the metric."""
    return (df["stage"] == "finetune") & (df["status"] != ERROR_STATUS) & np.isfinite(df[metric])


def in_time_order(df: pd.DataFrame) -> pd.DataFrame:
    """A prepared frame's rows by start time (ties and missing times: table order)."""
    return df.sort_values(["start_time", "_order"], na_position="last", kind="stable")
