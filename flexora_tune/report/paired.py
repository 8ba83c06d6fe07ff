"""Paired verdicts: each strategy against a reference strategy, seed by seed.

Every strategy runs the same seeds, and a seed fixes the data split and order, so the chosen trials of two
strategies on one seed are a pair. The per-seed difference (strategy minus reference) of the chosen trial's
validation metric and of its test metric removes what the seed alone explains; their mean gets a Student t
interval over seeds, and the verdict says whether that interval excludes zero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..results import Mode
from .stats import mean_confidence_interval

#: The strategy every other one is compared with unless told otherwise: fine-tuning every block.
DEFAULT_REFERENCE = "all"
#: The confidence of the intervals and verdicts.
CONFIDENCE = 0.95
#: A verdict needs at least this many paired seeds; with fewer the interval is too wide to mean much.
MIN_PAIRS = 3
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference"
REFERENCE_VERDICT = "reference"
NO_PAIRS = "no paired seeds"
NO_TEST_VALUES = "no test values"
#: The columns `paired_verdicts` adds to a summary (after ``strategy``), in order.
PAIRED_COLUMNS: tuple[str, ...] = (
    "test_diff_mean", "test_diff_lo", "test_diff_hi", "test_verdict",
    "val_diff_mean", "val_diff_lo", "val_diff_hi", "val_verdict", "n_pairs", "reference",
)


def too_few_seeds(n: int) -> str:
    """The verdict when `n` paired seeds are too few to give one."""
    return f"too few seeds (n={n})"


def no_reference(reference: str) -> str:
    """The verdict when the reference strategy is not in the trials table."""
    return f"no reference ({reference!r} not run)"


def verdict(low: float, high: float, n: int, mode: Mode) -> str:
    """"better", "worse" or "no difference" for a difference (strategy minus reference) whose interval is
    [`low`, `high`] over `n` paired seeds; a better difference is positive for ``mode="max"`` and negative for
    ``"min"``. With fewer than `MIN_PAIRS` seeds the verdict says so instead."""
    if n == 0:
        return NO_PAIRS
    if n < MIN_PAIRS or math.isnan(low) or math.isnan(high):
        return too_few_seeds(n)
    if low > 0:
        return BETTER if mode == "max" else WORSE
    if high < 0:
        return WORSE if mode == "max" else BETTER
    return NO_DIFFERENCE


def _difference(values: pd.Series, mode: Mode, confidence: float, n_pairs: int) -> dict[str, Any]:
    mean, low, high, n = mean_confidence_interval(values, confidence)
    result = verdict(low, high, n, mode) if n or not n_pairs else NO_TEST_VALUES
    return {"diff_mean": mean, "diff_lo": low, "diff_hi": high, "verdict": result}


def _empty_row(strategy: str, reference: str, label: str, n_pairs: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"strategy": strategy, "reference": reference, "n_pairs": n_pairs}
    for prefix in ("test", "val"):
        row.update({f"{prefix}_diff_mean": np.nan, f"{prefix}_diff_lo": np.nan, f"{prefix}_diff_hi": np.nan,
                    f"{prefix}_verdict": label})
    return row


def paired_verdicts(
    per_seed: pd.DataFrame, mode: Mode, reference: str = DEFAULT_REFERENCE, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """One row per strategy of `per_seed` (`best_per_seed`'s table): its paired difference from `reference`.

    For every seed where both the strategy and the reference have a chosen trial (``n_pairs`` of them), the
    difference strategy minus reference of ``test_of_best`` and of ``best_val``; then, for each, the mean
    (``*_diff_mean``), the two-sided `confidence` Student t interval over seeds (``*_diff_lo``/``*_diff_hi``,
    NaN with one seed) and a verdict (``*_verdict``): "better", "worse" or "no difference" (the interval
    excludes zero or not), "too few seeds (n=2)" below `MIN_PAIRS` seeds, "no paired seeds" without a common
    seed. The test metric is the validation metric's counterpart, so both follow `mode`. The reference's own
    row says "reference"; when the reference did not run, every row says so.
    """
    strategies = sorted(per_seed["strategy"].astype(str).unique())
    if reference not in strategies:
        return pd.DataFrame([_empty_row(s, reference, no_reference(reference), 0) for s in strategies],
                            columns=["strategy", *PAIRED_COLUMNS]).astype({"n_pairs": "Int64"})
    ok = per_seed.dropna(subset=["best_val"])
    base = ok[ok["strategy"] == reference].set_index("seed")[["best_val", "test_of_best"]]
    rows = []
    for strategy in strategies:
        if strategy == reference:
            rows.append(_empty_row(strategy, reference, REFERENCE_VERDICT, pd.NA))
            continue
        mine = ok[ok["strategy"] == strategy].set_index("seed")[["best_val", "test_of_best"]]
        pairs = mine.merge(base, left_index=True, right_index=True, suffixes=("", "_ref"))
        n_pairs = len(pairs)
        row: dict[str, Any] = {"strategy": strategy, "reference": reference, "n_pairs": n_pairs}
        for prefix, column in (("test", "test_of_best"), ("val", "best_val")):
            diff = _difference(pairs[column] - pairs[f"{column}_ref"], mode, confidence, n_pairs)
            row.update({f"{prefix}_{key}": value for key, value in diff.items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=["strategy", *PAIRED_COLUMNS]).astype({"n_pairs": "Int64"})
