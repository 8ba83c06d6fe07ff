"""Compute in fine-tune equivalents: a trial's FLOPs divided by those of one all-blocks fine-tune.

Wall seconds move with whatever else shares the machine; FLOPs are a function of the settings and the data.
Dividing them by the FLOPs of the comparison's own all-blocks fine-tune (the ``all`` strategy's trial of the
same seed) gives a unit a reader can picture: "compute to best 2.4" means the strategy spent as much as 2.4
all-blocks fine-tunes before it found its best trial, search included.

When ``all`` did not run for a seed, its unit is the largest finished fine-tune of that seed, whatever its
strategy. An all-blocks fine-tune costs at least as much as any other fine-tune, so fine-tune equivalents of
such a seed may read high; the report says so.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..results import FLOPS as FLOPS_COLUMN
from .trials import ERROR_STATUS

#: The strategy whose fine-tune defines one fine-tune equivalent.
FULL_FINETUNE_STRATEGY = "all"
UNIT_FROM_ALL = "all"
UNIT_FROM_LARGEST = "largest fine-tune"
#: The columns of `finetune_units`' result.
UNIT_COLUMNS: tuple[str, ...] = ("seed", "unit_flops", "unit_source")


def _flops(trials: pd.DataFrame) -> pd.Series:
    if FLOPS_COLUMN not in trials.columns:
        return pd.Series(np.nan, index=trials.index, dtype=float)
    return pd.to_numeric(trials[FLOPS_COLUMN], errors="coerce").astype(float)


def has_flops(trials: pd.DataFrame) -> bool:
    """Whether `trials` has a ``flops`` column with at least one finite number."""
    return bool(np.isfinite(_flops(trials)).any())


def finetune_units(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per seed: the FLOPs of one fine-tune equivalent (``unit_flops``) and where they come from
    (``unit_source``: ``"all"`` or ``"largest fine-tune"``; NaN when the seed has no finished fine-tune with
    FLOPs). Only finished fine-tunes count (stage ``finetune``, not errored, positive FLOPs)."""
    flops = _flops(trials)
    stage = trials["stage"].astype(str).str.strip().str.lower()
    status = trials["status"].fillna("").astype(str).str.strip().str.upper()
    usable = (stage == "finetune") & (status != ERROR_STATUS) & np.isfinite(flops) & (flops > 0)
    frame = pd.DataFrame({"seed": trials["seed"], "strategy": trials["strategy"].astype(str), "flops": flops,
                          "usable": usable})
    rows = []
    for seed, group in frame.groupby("seed", sort=True, dropna=False):
        group = group[group["usable"]]
        full = group[group["strategy"] == FULL_FINETUNE_STRATEGY]
        if len(full):
            rows.append((seed, float(full["flops"].max()), UNIT_FROM_ALL))
        elif len(group):
            rows.append((seed, float(group["flops"].max()), UNIT_FROM_LARGEST))
        else:
            rows.append((seed, np.nan, np.nan))
    return pd.DataFrame(rows, columns=list(UNIT_COLUMNS))


def finetune_equivalents(trials: pd.DataFrame) -> pd.Series | None:
    """Each trial's FLOPs in fine-tune equivalents of its seed (`finetune_units`), on `trials`' index; NaN
    where the trial has no FLOPs or its seed no unit. None when the table has no ``flops`` numbers at all."""
    if not has_flops(trials):
        return None
    units = finetune_units(trials)
    unit = trials["seed"].map(dict(zip(units["seed"], units["unit_flops"], strict=True))).astype(float)
    return _flops(trials) / unit


def _seeds(seeds: Iterable[object]) -> str:
    return ", ".join(str(s) for s in seeds)


def units_note(trials: pd.DataFrame) -> str | None:
    """A sentence for the report on what one fine-tune equivalent is here, naming the seeds whose unit is not
    an ``all`` fine-tune; None when the table has no FLOPs."""
    if not has_flops(trials):
        return None
    units = finetune_units(trials)
    note = (f"Compute in fine-tune equivalents (ft) is FLOPs divided by those of the `{FULL_FINETUNE_STRATEGY}` "
            "strategy's fine-tune of the same seed.")
    largest = units.loc[units["unit_source"] == UNIT_FROM_LARGEST, "seed"]
    if len(largest):
        note += (f" `{FULL_FINETUNE_STRATEGY}` has no finished fine-tune for seed(s) {_seeds(largest)}: there the "
                 "unit is the largest finished fine-tune's FLOPs, which an all-blocks fine-tune would exceed, so "
                 "those figures may read high.")
    missing = units.loc[units["unit_source"].isna(), "seed"]
    if len(missing):
        note += f" Seed(s) {_seeds(missing)} have no finished fine-tune with FLOPs, so no fine-tune equivalents."
    return note
