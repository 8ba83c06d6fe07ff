"""The floors in a summary: reference rows (``kind`` ``floor``) after the strategies, every strategy marked by
whether its chosen trials beat the majority-class floor, the notes that say what the floors are, and the one
warning when no strategy beats it.

Everything here reads the summary table alone (as ``summary.csv`` holds it), so the printed table, ``summary.md``
and a later ``flexora-tune report`` say the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..floors import SEEDS_NOTE, Floors, improvement_hint
from ..results import BEATS_MAJORITY_CLASS, MAJORITY_CLASS, Mode, infer_mode
from .trials import paired_test_metric

KIND_COLUMN = "kind"
STRATEGY_KIND, FLOOR_KIND = "strategy", "floor"
NOTE_COLUMN = "note"
#: The columns floors add at the end of a summary: the row's kind, whether a strategy beats the majority-class
#: floor on the validation metric (empty when the floor has no value of it), and a floor's note.
FLOOR_COLUMNS: tuple[str, ...] = (KIND_COLUMN, BEATS_MAJORITY_CLASS, NOTE_COLUMN)
_COUNT_COLUMNS = ("n_seeds", "n_seeds_ok", "n_trials", "n_errors")


def beats(value: Any, floor: float, mode: Mode) -> bool:
    """Whether `value` is strictly better than `floor` in `mode`'s direction (a tie does not beat it)."""
    if value is None or pd.isna(value):
        return False
    return float(value) > floor if mode == "max" else float(value) < floor


def add_floors(summary: pd.DataFrame, floors: Floors | None, metric: str, mode: Mode) -> pd.DataFrame:
    """`summary` (strategy rows) with the `FLOOR_COLUMNS` filled in and one reference row per floor at the end;
    `summary` itself without `floors` (a folder from before floors keeps its columns).

    A floor row carries its validation value in ``best_val_mean`` and its test value in ``test_of_best_mean``
    (NaN where it has none or does not apply, as ``no-fine-tune`` for a classification head); every other
    column of it is empty."""
    if floors is None:
        return summary
    summary = summary.copy()
    summary[KIND_COLUMN] = STRATEGY_KIND
    majority = floors.majority.value(metric) if floors.majority else None
    summary[BEATS_MAJORITY_CLASS] = (np.nan if majority is None else
                                     summary["best_val_mean"].map(lambda v: beats(v, majority, mode)).astype(object))
    summary[NOTE_COLUMN] = np.nan
    rows = [{"strategy": f.name, "best_val_mean": _value(f.value(metric)),
             "test_of_best_mean": _value(f.value(paired_test_metric(metric))), KIND_COLUMN: FLOOR_KIND,
             NOTE_COLUMN: f.note} for f in floors.floors]
    table = pd.concat([summary, pd.DataFrame(rows)], ignore_index=True)[list(summary.columns)]
    return table.astype({c: "Int64" for c in _COUNT_COLUMNS if c in table.columns})


def _value(value: float | None) -> float:
    return np.nan if value is None else value


def is_floor(summary: pd.DataFrame) -> pd.Series:
    """Which rows of a summary are floors (none in a summary written before floors)."""
    if KIND_COLUMN not in summary.columns:
        return pd.Series(False, index=summary.index)
    return summary[KIND_COLUMN].astype(str) == FLOOR_KIND


def flag(value: Any) -> bool | None:
    """A ``beats_majority_class`` cell as True/False, or None when empty (also as CSV reads it back)."""
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return bool(value)


def majority_value(summary: pd.DataFrame) -> float | None:
    """The majority-class floor's validation value in `summary`, or None without one."""
    rows = summary[is_floor(summary) & (summary["strategy"].astype(str) == MAJORITY_CLASS)]
    values = pd.to_numeric(rows["best_val_mean"], errors="coerce").dropna()
    return float(values.iloc[0]) if len(values) else None


def below_marker(metric: str) -> str:
    """What the table adds to a strategy's value when it does not beat the majority-class floor."""
    return "(≤ floor)" if infer_mode(metric) == "max" else "(≥ floor)"


def floor_notes(summary: pd.DataFrame, metric: str) -> list[str]:
    """The sentences under a table with floor rows: what each floor is and, when some strategy is marked, what
    the mark means."""
    floors = summary[is_floor(summary)]
    if floors.empty:
        return []
    described = " ".join(f"{r.strategy}: {r.note}." if isinstance(r.note, str) and r.note else f"{r.strategy}."
                         for r in floors.itertuples(index=False))
    notes = [f"Floor rows are references, not strategies; they are {SEEDS_NOTE}. {described}"]
    majority = majority_value(summary)
    strategies = summary[~is_floor(summary)]
    if majority is not None and any(flag(v) is False for v in strategies.get(BEATS_MAJORITY_CLASS, ())):
        notes.append(f"{below_marker(metric)}: the strategy's chosen trials do not beat the majority-class floor "
                     f"({metric} {majority:.3f}).")
    return notes


def floor_warning(summary: pd.DataFrame, metric: str) -> str | None:
    """The one warning when no strategy with a result beats the majority-class floor on `metric`; else None."""
    majority = majority_value(summary)
    if majority is None or BEATS_MAJORITY_CLASS not in summary.columns:
        return None
    strategies = summary[~is_floor(summary)]
    ran = strategies[pd.to_numeric(strategies["best_val_mean"], errors="coerce").notna()]
    if ran.empty or any(flag(v) for v in ran[BEATS_MAJORITY_CLASS]):
        return None
    return (f"warning: no strategy beats the majority-class floor ({metric} {majority:.3f}): the fine-tunes learned "
            "nothing beyond the label frequencies, and the differences between strategies are noise; "
            f"{improvement_hint()}.")
