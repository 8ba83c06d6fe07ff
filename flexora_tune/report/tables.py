"""Summaries of a trials table: each strategy+seed's best fine-tune, the per-strategy aggregate, and the
overall winning block selection.

The selection rule, everywhere: trials are compared by the *validation* metric only (ties: less compute,
then the earlier start). The test metric of the chosen trial is carried along and reported, never compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..blocks import BlockSelection, format_blocks
from ..floors import Floors
from ..results import DEFAULT_METRIC, Mode, infer_mode
from .compute import finetune_equivalents
from .floor_rows import add_floors
from .paired import DEFAULT_REFERENCE, PAIRED_COLUMNS, paired_verdicts
from .trials import ERROR_STATUS, eligible, in_time_order, prepare_trials

#: The compute columns in fine-tune equivalents (NaN when the trials have no ``flops``).
FT_COLUMNS: tuple[str, ...] = ("compute_to_best_ft", "total_compute_ft")
#: The columns of `summarize`'s result (and of ``summary.csv``), in order; with floors, `FLOOR_COLUMNS` follow.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "strategy", "best_val_mean", "best_val_std", "test_of_best_mean", "test_of_best_std", "compute_to_best_mean",
    "total_compute_mean", "n_seeds", "n_seeds_ok", "n_trials", "n_errors", "blocks_of_best", "num_blocks_of_best",
    "best_trial_id", *FT_COLUMNS, *PAIRED_COLUMNS,
)
#: The columns of `best_per_seed`'s result, in order.
PER_SEED_COLUMNS: tuple[str, ...] = (
    "strategy", "seed", "best_val", "test_of_best", "compute_to_best", "total_compute", "n_trials", "n_errors",
    "best_trial_id", "best_compute_s", "best_start_time", "blocks", "num_blocks", "num_blocks_total", *FT_COLUMNS,
)


class NoSuccessfulTrialError(ValueError):
    """No fine-tune trial finished with a value of the chosen metric, so there is nothing to choose."""


def _rank(df: pd.DataFrame, metric: str, mode: Mode) -> pd.DataFrame:
    """`df` best first: by metric, then less compute, then earlier start, then table order. Never by test."""
    return df.sort_values(
        [metric, "compute_s", "start_time", "_order"],
        ascending=[mode == "min", True, True, True],
        na_position="last",
        kind="stable",
    )


def _seed_row(strategy: str, seed: Any, group: pd.DataFrame, metric: str, mode: Mode) -> dict[str, Any]:
    """One strategy+seed: its best fine-tune by the metric and the compute spent up to and including it."""
    ordered = in_time_order(group)
    cumulative = ordered["compute_s"].fillna(0.0).cumsum()
    has_ft = bool(ordered["_ft"].notna().any())
    cumulative_ft = ordered["_ft"].fillna(0.0).cumsum()
    candidates = ordered[eligible(ordered, metric)]
    row: dict[str, Any] = {
        "strategy": strategy, "seed": seed, "best_val": np.nan, "test_of_best": np.nan,
        "compute_to_best": np.nan, "total_compute": float(cumulative.iloc[-1]), "n_trials": len(ordered),
        "n_errors": int((ordered["status"] == ERROR_STATUS).sum()), "best_trial_id": np.nan,
        "best_compute_s": np.nan, "best_start_time": np.nan, "blocks": np.nan, "num_blocks": np.nan,
        "num_blocks_total": np.nan, "compute_to_best_ft": np.nan,
        "total_compute_ft": float(cumulative_ft.iloc[-1]) if has_ft else np.nan,
    }
    if candidates.empty:
        return row
    label = _rank(candidates, metric, mode).index[0]
    best = ordered.loc[label]
    blocks = best["_blocks"]
    row.update(
        best_val=float(best[metric]), test_of_best=float(best["_test"]), compute_to_best=float(cumulative.loc[label]),
        best_trial_id=str(best["trial_id"]), best_compute_s=float(best["compute_s"]),
        best_start_time=float(best["start_time"]), blocks=format_blocks(blocks),
        num_blocks=len(blocks) if blocks else np.nan, num_blocks_total=float(best["num_blocks_total"]),
        compute_to_best_ft=float(cumulative_ft.loc[label]) if has_ft else np.nan,
    )
    return row


def best_per_seed(trials: pd.DataFrame, metric: str = DEFAULT_METRIC, mode: Mode | None = None) -> pd.DataFrame:
    """One row per (strategy, seed): the best fine-tune trial by `metric` and what it cost.

    ``compute_to_best`` sums ``compute_s`` of that strategy+seed's trials, search trials included, in
    ``start_time`` order up to and including the best trial; ``total_compute`` sums all of them. Errored
    trials count in compute but never win; a strategy+seed without a successful fine-tune gets NaNs.
    ``compute_to_best_ft``/``total_compute_ft`` are the same sums of ``flops`` in fine-tune equivalents of that
    seed (`finetune_units`), NaN when the table has no ``flops``.
    """
    mode = mode or infer_mode(metric)
    df = prepare_trials(trials, metric)
    ft = finetune_equivalents(df)
    df["_ft"] = ft if ft is not None else np.nan
    rows = [
        _seed_row(strategy, seed, group, metric, mode)
        for (strategy, seed), group in df.groupby(["strategy", "seed"], sort=True, dropna=False)
    ]
    result = pd.DataFrame(rows, columns=list(PER_SEED_COLUMNS))
    return result.astype({"num_blocks": "Int64", "num_blocks_total": "Int64"})


def _std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else np.nan


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else np.nan


def _strategy_row(strategy: str, seeds: pd.DataFrame, mode: Mode) -> dict[str, Any]:
    ok = seeds.dropna(subset=["best_val"])
    row: dict[str, Any] = {
        "strategy": strategy,
        "best_val_mean": float(ok["best_val"].mean()) if len(ok) else np.nan,
        "best_val_std": _std(ok["best_val"]),
        "test_of_best_mean": float(ok["test_of_best"].mean()) if ok["test_of_best"].notna().any() else np.nan,
        "test_of_best_std": _std(ok["test_of_best"]),
        "compute_to_best_mean": float(ok["compute_to_best"].mean()) if len(ok) else np.nan,
        "total_compute_mean": float(seeds["total_compute"].mean()),
        "n_seeds": len(seeds), "n_seeds_ok": len(ok), "n_trials": int(seeds["n_trials"].sum()),
        "n_errors": int(seeds["n_errors"].sum()), "blocks_of_best": np.nan, "num_blocks_of_best": pd.NA,
        "best_trial_id": np.nan, "compute_to_best_ft": _mean(ok["compute_to_best_ft"]),
        "total_compute_ft": _mean(seeds["total_compute_ft"]),
    }
    if len(ok):
        ranked = ok.sort_values(
            ["best_val", "best_compute_s", "best_start_time", "best_trial_id"],
            ascending=[mode == "min", True, True, True], na_position="last", kind="stable",
        )
        top = ranked.iloc[0]
        row.update(
            blocks_of_best=top["blocks"], num_blocks_of_best=top["num_blocks"], best_trial_id=top["best_trial_id"]
        )
    return row


def summarize(
    trials: pd.DataFrame, metric: str = DEFAULT_METRIC, mode: Mode | None = None, reference: str = DEFAULT_REFERENCE,
    floors: Floors | None = None,
) -> pd.DataFrame:
    """One row per strategy, best first: quality and cost of each seed's best trial, aggregated over seeds.

    For each (strategy, seed) the best fine-tune trial is chosen by `metric` (a validation metric, else a
    `ValueError`; `mode` defaults to ``"min"`` for losses, else ``"max"``), then:

    - ``best_val_mean``/``_std``: that trial's metric over seeds (std with ddof=1; NaN for one seed);
    - ``test_of_best_mean``/``_std``: the test metric *of that same trial* (never the best test value);
    - ``compute_to_best_mean``: compute seconds, search trials included, up to and including it;
    - ``total_compute_mean``: all of that strategy+seed's compute;
    - ``n_seeds`` (seeds run), ``n_seeds_ok`` (seeds with a successful fine-tune), ``n_trials``, ``n_errors``;
    - ``blocks_of_best``/``num_blocks_of_best``/``best_trial_id``: the single best trial over all seeds;
    - ``compute_to_best_ft``/``total_compute_ft``: the two compute means in fine-tune equivalents (FLOPs over one
      all-blocks fine-tune of the same seed; NaN without a ``flops`` column);
    - the paired comparison with `reference` over seeds (`paired_verdicts`): ``test_diff_*``/``val_diff_*``
      (mean, 95% interval), ``test_verdict``/``val_verdict``, ``n_pairs`` and ``reference``.

    A strategy with no successful trial keeps its row, with NaNs, so failures stay visible. With `floors`
    (`floors.read_floors`), the `FLOOR_COLUMNS` follow: ``kind`` (``strategy``), ``beats_majority_class``
    (whether ``best_val_mean`` is better than the majority-class floor's) and ``note``; and one reference row
    per floor follows the strategies (``kind`` ``floor``, its validation and test values in
    ``best_val_mean``/``test_of_best_mean``; see `floor_rows.add_floors`).
    """
    mode = mode or infer_mode(metric)
    per_seed = best_per_seed(trials, metric, mode)
    rows = [_strategy_row(strategy, seeds, mode) for strategy, seeds in per_seed.groupby("strategy", sort=True)]
    base = pd.DataFrame(rows, columns=[c for c in SUMMARY_COLUMNS if c not in PAIRED_COLUMNS])
    base["strategy"] = base["strategy"].astype(str)
    paired = paired_verdicts(per_seed, mode, reference)
    summary = base.merge(paired, on="strategy", how="left")[list(SUMMARY_COLUMNS)]
    summary = summary.astype({"num_blocks_of_best": "Int64", "n_pairs": "Int64"})
    summary = summary.sort_values(
        ["best_val_mean", "strategy"], ascending=[mode == "min", True], na_position="last", kind="stable"
    )
    return add_floors(summary.reset_index(drop=True), floors, metric, mode)


def best_selection(
    trials: pd.DataFrame, metric: str = DEFAULT_METRIC, mode: Mode | None = None
) -> tuple[BlockSelection, pd.Series]:
    """The winning block selection over all strategies and seeds, and its trial row.

    Chosen by the validation `metric` (anything else is a `ValueError`) among successful fine-tune trials;
    ties go to less ``compute_s``, then the earlier trial. The test metric plays no part. Raises
    `NoSuccessfulTrialError` when nothing finished.
    """
    mode = mode or infer_mode(metric)
    df = prepare_trials(trials, metric)
    candidates = df[eligible(df, metric)]
    if candidates.empty:
        raise NoSuccessfulTrialError(
            f"no fine-tune trial finished with a {metric} value ({len(df)} trials, "
            f"{int((df['status'] == ERROR_STATUS).sum())} errored); nothing to choose"
        )
    label = _rank(candidates, metric, mode).index[0]
    blocks = df.loc[label, "_blocks"]
    if blocks is None:
        raise ValueError(f"best trial {df.loc[label, 'trial_id']!r} has unreadable blocks {df.loc[label, 'blocks']!r}")
    selection = BlockSelection(blocks, int(df.loc[label, "num_blocks_total"]))
    return selection, trials.iloc[int(df.loc[label, "_order"])]
