"""Results of a strategy comparison: the summary table, the plots and the exported best selection.

A results folder holds ``trials.csv`` (one row per trial; ``flexora-tune compare`` writes it, or
`write_trials`), optionally ``search_trajectories.json`` (Flexora's alpha per recorded search step) and
``meta.json`` (model, task, metric, LoRA ``target_modules`` and ``layers_pattern``). `write_report` turns
it into ``summary.csv`` / ``summary.md``, three PNG plots, ``best_selection.json`` and
``best_lora_config/adapter_config.json``.

The selection rule, everywhere in this module: trials are compared by the *validation* metric only (ties:
less compute). The test metric of the chosen trial is carried along and reported, never compared.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .blocks import BlockSelection, format_blocks, parse_blocks

Mode = Literal["max", "min"]

TRIALS_FILE = "trials.csv"
TRIALS_PARQUET_FILE = "trials.parquet"
TRAJECTORIES_FILE = "search_trajectories.json"
META_FILE = "meta.json"
SUMMARY_CSV_FILE = "summary.csv"
SUMMARY_MD_FILE = "summary.md"
BEST_SO_FAR_FILE = "best_so_far.png"
GATES_HEATMAP_FILE = "gates_heatmap.png"
BLOCK_MAP_FILE = "block_map.png"
BEST_SELECTION_FILE = "best_selection.json"
BEST_LORA_CONFIG_DIR = "best_lora_config"

DEFAULT_METRIC = "val_accuracy"
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")
DEFAULT_LAYERS_PATTERN = "layers"

#: Columns every trials table must have (the metric column is checked separately).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "trial_id", "strategy", "seed", "stage", "blocks", "num_blocks_total", "compute_s", "start_time", "status",
)
#: The columns of `summarize`'s result (and of ``summary.csv``), in order.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "strategy", "best_val_mean", "best_val_std", "test_of_best_mean", "test_of_best_std", "compute_to_best_mean",
    "total_compute_mean", "n_seeds", "n_seeds_ok", "n_trials", "n_errors", "blocks_of_best", "num_blocks_of_best",
    "best_trial_id",
)
#: The columns of `best_per_seed`'s result, in order.
PER_SEED_COLUMNS: tuple[str, ...] = (
    "strategy", "seed", "best_val", "test_of_best", "compute_to_best", "total_compute", "n_trials", "n_errors",
    "best_trial_id", "best_compute_s", "best_start_time", "blocks", "num_blocks", "num_blocks_total",
)

_ERROR_STATUS = "ERROR"
_TEXT_COLUMNS = ("trial_id", "strategy", "stage", "status", "node", "blocks", "alpha")
_MIN_WORDS = ("loss", "error", "perplexity", "ppl")
_KNOWN_COLORS = {
    "flexora": "#d62728", "random": "#1f77b4", "tpe": "#2ca02c", "all": "#7f7f7f",
    "first-k": "#9467bd", "last-k": "#8c564b",
}
_EXTRA_COLORS = ("#ff7f0e", "#17becf", "#bcbd22", "#e377c2", "#393b79", "#637939", "#843c39", "#7b4173")


class NoSuccessfulTrialError(ValueError):
    """No fine-tune trial finished with a value of the chosen metric, so there is nothing to choose."""


# --------------------------------------------------------------------------------------------------------
# Reading, validating and writing trials
# --------------------------------------------------------------------------------------------------------


def infer_mode(metric: str) -> Mode:
    """``"min"`` for losses/errors/perplexities, ``"max"`` for everything else (accuracies, F1, ...)."""
    name = metric.lower()
    return "min" if any(word in name for word in _MIN_WORDS) else "max"


def paired_test_metric(metric: str) -> str:
    """The reported-only counterpart of a validation metric: ``val_accuracy`` -> ``test_accuracy``."""
    return "test_" + metric[len("val_"):] if metric.startswith("val_") else "test_" + metric


def _metric_columns(columns: Iterable[str]) -> list[str]:
    return sorted(c for c in columns if str(c).startswith("val_"))


def validate_trials(trials: pd.DataFrame, metric: str = DEFAULT_METRIC) -> None:
    """Raise a `ValueError` if `trials` lacks a required column or `metric` is not a usable validation metric.

    A test metric is refused as `metric`: test results are reported, never used to choose.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in trials.columns]
    if missing:
        raise ValueError(
            f"trials table is missing required columns {missing}; it has {list(map(str, trials.columns))}. "
            f"Every trial row needs {list(REQUIRED_COLUMNS)} plus the metric column (e.g. {DEFAULT_METRIC!r})."
        )
    available = _metric_columns(trials.columns)
    if metric.startswith("test_"):
        raise ValueError(
            f"metric {metric!r} is a test metric: test results are reported only, never used to choose. "
            f"Choose by a validation metric: {available}"
        )
    if metric not in trials.columns:
        raise ValueError(
            f"metric {metric!r} is not a column of the trials table; available metric columns: {available}"
        )


def _compact_blocks(blocks: Sequence[int] | None) -> str:
    """``[0, 1, 2, 3, 7, 8]`` -> ``"0-3,7,8"`` for display (runs of three or more as ranges)."""
    if not blocks:
        return "-"
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    parts = [f"{lo}-{hi}" if hi - lo >= 2 else ",".join(map(str, range(lo, hi + 1))) for lo, hi in runs]
    return ",".join(parts)


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


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    with path.open() as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------


def _prepared(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A validated copy with normalised types, a test-metric column and the original row order."""
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


def _eligible(df: pd.DataFrame, metric: str) -> pd.Series:
    """Trials that may win: finished fine-tunes (not errored) with a finite value of the metric."""
    return (df["stage"] == "finetune") & (df["status"] != _ERROR_STATUS) & np.isfinite(df[metric])


def _rank(df: pd.DataFrame, metric: str, mode: Mode) -> pd.DataFrame:
    """`df` best first: by metric, then less compute, then earlier start, then table order. Never by test."""
    return df.sort_values(
        [metric, "compute_s", "start_time", "_order"],
        ascending=[mode == "min", True, True, True],
        na_position="last",
        kind="stable",
    )


def _in_time_order(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["start_time", "_order"], na_position="last", kind="stable")


def _seed_row(strategy: str, seed: Any, group: pd.DataFrame, metric: str, mode: Mode) -> dict[str, Any]:
    """One strategy+seed: its best fine-tune by the metric and the compute spent up to and including it."""
    ordered = _in_time_order(group)
    cumulative = ordered["compute_s"].fillna(0.0).cumsum()
    candidates = ordered[_eligible(ordered, metric)]
    row: dict[str, Any] = {
        "strategy": strategy, "seed": seed, "best_val": np.nan, "test_of_best": np.nan,
        "compute_to_best": np.nan, "total_compute": float(cumulative.iloc[-1]), "n_trials": len(ordered),
        "n_errors": int((ordered["status"] == _ERROR_STATUS).sum()), "best_trial_id": np.nan,
        "best_compute_s": np.nan, "best_start_time": np.nan, "blocks": np.nan, "num_blocks": np.nan,
        "num_blocks_total": np.nan,
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
    )
    return row


def best_per_seed(trials: pd.DataFrame, metric: str = DEFAULT_METRIC, mode: Mode | None = None) -> pd.DataFrame:
    """One row per (strategy, seed): the best fine-tune trial by `metric` and what it cost.

    ``compute_to_best`` sums ``compute_s`` of that strategy+seed's trials, search trials included, in
    ``start_time`` order up to and including the best trial; ``total_compute`` sums all of them. Errored
    trials count in compute but never win; a strategy+seed without a successful fine-tune gets NaNs.
    """
    mode = mode or infer_mode(metric)
    df = _prepared(trials, metric)
    rows = [
        _seed_row(strategy, seed, group, metric, mode)
        for (strategy, seed), group in df.groupby(["strategy", "seed"], sort=True, dropna=False)
    ]
    result = pd.DataFrame(rows, columns=list(PER_SEED_COLUMNS))
    return result.astype({"num_blocks": "Int64", "num_blocks_total": "Int64"})


def _std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else np.nan


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
        "best_trial_id": np.nan,
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


def summarize(trials: pd.DataFrame, metric: str = DEFAULT_METRIC, mode: Mode | None = None) -> pd.DataFrame:
    """One row per strategy, best first: quality and cost of each seed's best trial, aggregated over seeds.

    For each (strategy, seed) the best fine-tune trial is chosen by `metric` (a validation metric; `mode`
    defaults to ``"min"`` for losses, else ``"max"``), then:

    - ``best_val_mean``/``_std``: that trial's metric over seeds (std with ddof=1; NaN for one seed);
    - ``test_of_best_mean``/``_std``: the test metric *of that same trial* (never the best test value);
    - ``compute_to_best_mean``: compute seconds, search trials included, up to and including it;
    - ``total_compute_mean``: all of that strategy+seed's compute;
    - ``n_seeds`` (seeds run), ``n_seeds_ok`` (seeds with a successful fine-tune), ``n_trials``, ``n_errors``;
    - ``blocks_of_best``/``num_blocks_of_best``/``best_trial_id``: the single best trial over all seeds.

    A strategy with no successful trial keeps its row, with NaNs, so failures stay visible.
    """
    mode = mode or infer_mode(metric)
    per_seed = best_per_seed(trials, metric, mode)
    rows = [_strategy_row(strategy, seeds, mode) for strategy, seeds in per_seed.groupby("strategy", sort=True)]
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).astype({"num_blocks_of_best": "Int64"})
    summary = summary.sort_values(
        ["best_val_mean", "strategy"], ascending=[mode == "min", True], na_position="last", kind="stable"
    )
    return summary.reset_index(drop=True)


def best_selection(
    trials: pd.DataFrame, metric: str = DEFAULT_METRIC, mode: Mode | None = None
) -> tuple[BlockSelection, pd.Series]:
    """The winning block selection over all strategies and seeds, and its trial row.

    Chosen by the validation `metric` among successful fine-tune trials; ties go to less ``compute_s``, then
    the earlier trial. The test metric plays no part. Raises `NoSuccessfulTrialError` when nothing finished.
    """
    mode = mode or infer_mode(metric)
    df = _prepared(trials, metric)
    candidates = df[_eligible(df, metric)]
    if candidates.empty:
        raise NoSuccessfulTrialError(
            f"no fine-tune trial finished with a {metric} value ({len(df)} trials, "
            f"{int((df['status'] == _ERROR_STATUS).sum())} errored); nothing to choose"
        )
    label = _rank(candidates, metric, mode).index[0]
    blocks = df.loc[label, "_blocks"]
    if blocks is None:
        raise ValueError(f"best trial {df.loc[label, 'trial_id']!r} has unreadable blocks {df.loc[label, 'blocks']!r}")
    selection = BlockSelection(blocks, int(df.loc[label, "num_blocks_total"]))
    return selection, trials.iloc[int(df.loc[label, "_order"])]


# --------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------


def _pm(mean: Any, std: Any, digits: int) -> str:
    """``0.873 ± 0.012``; just the mean when std is NaN; ``-`` when the mean is missing."""
    if mean is None or pd.isna(mean):
        return "-"
    if std is None or pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _display_rows(summary: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the Markdown and terminal tables."""
    test_metric = paired_test_metric(metric)
    header = [
        "strategy", f"best {metric}", f"{test_metric} of best", "compute to best (s)", "total compute (s)",
        "blocks of best", "seeds ok", "trials", "errors",
    ]
    rows = []
    for r in summary.itertuples(index=False):
        blocks = parse_blocks(r.blocks_of_best)
        rows.append([
            str(r.strategy),
            _pm(r.best_val_mean, r.best_val_std, 3),
            _pm(r.test_of_best_mean, r.test_of_best_std, 3),
            _pm(r.compute_to_best_mean, None, 1),
            _pm(r.total_compute_mean, None, 1),
            f"{_compact_blocks(blocks)} ({len(blocks)})" if blocks else "-",
            f"{r.n_seeds_ok}/{r.n_seeds}",
            str(r.n_trials),
            str(r.n_errors),
        ])
    return header, rows


def format_summary(summary: pd.DataFrame, metric: str = DEFAULT_METRIC) -> str:
    """A fixed-width text table of `summarize`'s result for the terminal (means ± std over seeds)."""
    header, rows = _display_rows(summary, metric)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_markdown(summary: pd.DataFrame, metric: str = DEFAULT_METRIC) -> str:
    """`summarize`'s result as a Markdown table (means ± std over seeds)."""
    header, rows = _display_rows(summary, metric)
    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


# --------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend change)
# --------------------------------------------------------------------------------------------------------


def strategy_colors(strategies: Iterable[str]) -> dict[str, str]:
    """A fixed colour per strategy name, the same in every plot."""
    colors: dict[str, str] = {}
    extra = iter(_EXTRA_COLORS * 4)
    for name in sorted(set(strategies)):
        colors[name] = _KNOWN_COLORS.get(name) or next(extra, "#000000")
    return colors


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def _best_so_far_steps(group: pd.DataFrame, metric: str, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative compute after each trial and the best metric value reached by then (NaN before any)."""
    ordered = _in_time_order(group)
    x = ordered["compute_s"].fillna(0.0).cumsum().to_numpy(dtype=float)
    values = ordered[metric].where(_eligible(ordered, metric))
    best = (values.cummax() if mode == "max" else values.cummin()).ffill()
    return x, best.to_numpy(dtype=float)


def _on_grid(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Step-function value of (x, y) at each grid point: the last y at or before it, NaN before the first."""
    idx = np.searchsorted(x, grid, side="right") - 1
    out = np.full(grid.shape, np.nan)
    out[idx >= 0] = y[idx[idx >= 0]]
    return out


def _common_grid(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, pd.DataFrame]:
    """Every seed's best-so-far on the union of their compute points, from where all seeds have a value
    (a median over only the seeds that have started would not be monotone)."""
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    stacked = pd.DataFrame({i: _on_grid(x, y, grid) for i, (x, y) in enumerate(curves)})
    keep = stacked.notna().all(axis=1).to_numpy()
    return grid[keep], stacked[keep]


def plot_best_so_far(
    trials: pd.DataFrame, path: str | Path, metric: str = DEFAULT_METRIC, mode: Mode | None = None
) -> Path:
    """Best-so-far `metric` against cumulative compute seconds (search trials included), one line per strategy.

    Each seed's curve (thin) is a step function over its trials in start order; the thick line is the median
    over seeds and the band the min-max over seeds, both drawn from the compute at which every seed with a
    result has one, ending in a dot with a min-max bar. Seeds without any successful trial are left out (the
    legend counts them).
    """
    mode = mode or infer_mode(metric)
    df = _prepared(trials, metric)
    colors = strategy_colors(df["strategy"])
    fig = _figure(8.0, 5.0)
    ax = fig.add_subplot()
    for strategy, group in df.groupby("strategy", sort=True):
        curves = [_best_so_far_steps(g, metric, mode) for _, g in group.groupby("seed", sort=True)]
        ok = [(x, y) for x, y in curves if np.isfinite(y).any()]
        label = f"{strategy} ({len(ok)}/{len(curves)} seeds with a result)"
        if not ok:
            ax.plot([], [], color=colors[strategy], linestyle=":", label=f"{strategy}: no successful trial")
            continue
        color = colors[strategy]
        for x, y in ok:
            ax.plot(x, y, drawstyle="steps-post", color=color, lw=0.8, alpha=0.45, marker="o", markersize=3,
                    markevery=[len(x) - 1])
        grid, stacked = _common_grid(ok)
        low, mid, high = stacked.min(axis=1), stacked.median(axis=1), stacked.max(axis=1)
        ax.plot(grid, mid, drawstyle="steps-post", color=color, lw=2.2, marker="o", markevery=[len(grid) - 1],
                label=label)
        ax.fill_between(grid, low, high, step="post", color=color, alpha=0.18, lw=0)
        ax.vlines(grid[-1], low.iloc[-1], high.iloc[-1], color=color, lw=2.2)  # the final spread, even for 1 point
    ax.set_xlabel("cumulative compute (s), search trials included")
    ax.set_ylabel(f"best {metric} so far")
    ax.set_title(f"Best-so-far {metric} vs compute\n"
                 "(thin: each seed; thick: median over seeds; band: min-max over seeds)")
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right" if mode == "max" else "upper right", fontsize="small")
    return _save(fig, path)


def gates_from_alpha(alpha: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Flexora's gates ``g = L * softmax(alpha)`` over the last axis (so a uniform alpha gives g = 1)."""
    a = np.asarray(alpha, dtype=float)
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return a.shape[-1] * e / e.sum(axis=-1, keepdims=True)


def _trajectory_arrays(trial_id: str, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, gates with shape blocks x steps) of one search trajectory, or None if it is unusable."""
    try:
        alpha = np.asarray(record["alpha"], dtype=float)
        steps = np.asarray(record.get("steps") or range(len(alpha)), dtype=float)
    except (KeyError, TypeError, ValueError):
        alpha, steps = np.empty(0), np.empty(0)
    if alpha.ndim != 2 or alpha.shape[0] == 0 or alpha.shape[1] == 0 or len(steps) != alpha.shape[0]:
        warnings.warn(f"search trajectory {trial_id!r} skipped: expected 'steps' and an 'alpha' of shape "
                      "steps x blocks", stacklevel=3)
        return None
    return steps, gates_from_alpha(alpha).T


def plot_gate_heatmap(
    trajectories: Mapping[str, Mapping[str, Any]], path: str | Path, max_panels: int = 4
) -> Path | None:
    """Flexora gates per block (y) over search steps (x), one panel per search trial (the first `max_panels`).

    `trajectories` is the content of ``search_trajectories.json``. The shared colour bar is centred at
    g = 1 (a block's share under uniform gates): red above, blue below. Returns None (and warns) when no
    trajectory is usable.
    """
    from matplotlib.colors import TwoSlopeNorm

    panels = []
    for trial_id, record in trajectories.items():
        arrays = _trajectory_arrays(str(trial_id), record)
        if arrays is not None:
            panels.append((str(trial_id), record, *arrays))
        if len(panels) == max_panels:
            break
    if not panels:
        warnings.warn("no usable search trajectory; gates heatmap not drawn", stacklevel=2)
        return None
    vmax = max(1.05, max(float(g.max()) for *_, g in panels))
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax)
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.5 * ncols + 1.0, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    mesh = None
    for ax, (trial_id, record, steps, gates) in zip(axes.flat, panels, strict=False):
        mesh = ax.pcolormesh(steps, np.arange(gates.shape[0]), gates, cmap="RdBu_r", norm=norm, shading="nearest")
        ax.set_title(f"{record.get('strategy', 'flexora')} seed {record.get('seed', '?')} ({trial_id})",
                     fontsize="medium")
        ax.set_xlabel("search step")
        ax.set_ylabel("block")
        ax.set_yticks(_block_ticks(gates.shape[0]))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(mesh, ax=axes, label="gate g = L·softmax(α)  (1 = uniform)")
    fig.suptitle("Flexora gates per block during search")
    return _save(fig, path)


def _block_ticks(num_blocks: int) -> list[int]:
    step = max(1, math.ceil(num_blocks / 16))
    return list(range(0, num_blocks, step))


def plot_block_map(
    trials: pd.DataFrame, path: str | Path, metric: str = DEFAULT_METRIC, mode: Mode | None = None
) -> Path:
    """Which blocks got LoRA: one row per strategy and seed (that seed's best fine-tune by `metric`), one
    column per block, filled in the strategy's colour. The metric value and block count are written at the
    right; the overall winner's row is starred.
    """
    from matplotlib.colors import to_rgb

    mode = mode or infer_mode(metric)
    per_seed = _by_strategy_rank(best_per_seed(trials, metric, mode), mode)
    totals = pd.to_numeric(trials["num_blocks_total"], errors="coerce")
    total = int(totals.max()) if totals.notna().any() else 1
    colors = strategy_colors(per_seed["strategy"])
    image = np.ones((len(per_seed), total, 3))
    for i, row in enumerate(per_seed.itertuples(index=False)):
        for b in parse_blocks(row.blocks) or ():
            if 0 <= b < total:
                image[i, b] = to_rgb(colors[row.strategy])
    winner = _winner_index(per_seed, mode)
    fig = _figure(max(7.0, 3.5 + 0.3 * total), 1.6 + 0.32 * len(per_seed))
    ax = fig.add_subplot()
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, total), minor=True)
    ax.set_yticks(np.arange(-0.5, len(per_seed)), minor=True)
    ax.grid(which="minor", color="#cccccc", lw=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks(_block_ticks(total))
    labels = [f"{'★ ' if i == winner else ''}{r.strategy} · seed {r.seed}" for i, r in enumerate(per_seed.itertuples())]
    ax.set_yticks(range(len(per_seed)), labels)
    for i, row in enumerate(per_seed.itertuples(index=False)):
        note = "no successful trial" if pd.isna(row.best_val) else f"{row.best_val:.3f}  ({row.num_blocks}/{total})"
        ax.annotate(note, (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize="small")
    ax.annotate(f"{metric} (blocks)", (1.01, -0.5), xycoords=("axes fraction", "data"), va="bottom",
                fontsize="small", fontweight="bold")
    ax.set_xlabel("block index")
    ax.set_title(f"Blocks with LoRA in each seed's best trial\n(chosen by {metric}; ★ = overall best)")
    return _save(fig, path)


def _by_strategy_rank(per_seed: pd.DataFrame, mode: Mode) -> pd.DataFrame:
    """Rows grouped by strategy, strategies in summary order (best mean first, failures last)."""
    means = per_seed.groupby("strategy")["best_val"].mean()
    ranked = means.sort_values(ascending=mode == "min", na_position="last", kind="stable").index
    rank = {name: i for i, name in enumerate(ranked)}
    ordered = per_seed.assign(_rank=per_seed["strategy"].map(rank)).sort_values(["_rank", "seed"], kind="stable")
    return ordered.drop(columns="_rank").reset_index(drop=True)


def _winner_index(per_seed: pd.DataFrame, mode: Mode) -> int | None:
    ok = per_seed.dropna(subset=["best_val"])
    if ok.empty:
        return None
    ranked = ok.sort_values(["best_val", "best_compute_s", "best_start_time"], ascending=[mode == "min", True, True],
                            na_position="last", kind="stable")
    return int(per_seed.index.get_loc(ranked.index[0]))


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA:
        return None
    return value


def _export_best(
    selection: BlockSelection, row: pd.Series, out: Path, metric: str, meta: Mapping[str, Any]
) -> dict[str, Path]:
    """Write best_selection.json and best_lora_config/adapter_config.json for the winning trial."""
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


def _markdown(
    summary: pd.DataFrame, metric: str, meta: Mapping[str, Any], best: tuple[BlockSelection, pd.Series] | None,
    images: Iterable[str],
) -> str:
    title = "flexora_tune comparison"
    if meta.get("model") or meta.get("task"):
        title += f": {meta.get('model', '?')} on {meta.get('task', '?')}"
    lines = [
        f"# {title}", "",
        f"Each seed's best fine-tune trial is chosen by `{metric}`; `{paired_test_metric(metric)}` is that same "
        "trial's test result, reported only and never used to choose. Values are mean ± std over seeds; "
        "compute includes search trials.", "",
        format_markdown(summary, metric), "",
    ]
    if best is not None:
        selection, row = best
        lines += [
            f"**Best selection:** blocks {_compact_blocks(selection.blocks)} ({len(selection)} of "
            f"{selection.num_blocks_total}) from `{row['strategy']}` seed {row['seed']} (trial `{row['trial_id']}`), "
            f"{metric} {float(row[metric]):.3f}. Exported to `{BEST_SELECTION_FILE}` and "
            f"`{BEST_LORA_CONFIG_DIR}/adapter_config.json`.", "",
        ]
    else:
        lines += ["**No successful fine-tune trial**: nothing was exported.", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Turn a results folder's ``trials.csv`` into the summary, the plots and the exported best selection.

    Reads ``trials.csv`` and, when present, ``search_trajectories.json`` and ``meta.json``. `metric` defaults
    to meta's ``"metric"``, else ``val_accuracy``. Writes ``summary.csv``, ``summary.md``,
    ``best_so_far.png``, ``block_map.png``, ``gates_heatmap.png`` (only with trajectories),
    ``best_selection.json`` and ``best_lora_config/adapter_config.json`` (only when some fine-tune
    succeeded; target modules and layers pattern from meta, else q_proj/v_proj and "layers" with a warning).
    Returns the paths written, keyed by artefact name.
    """
    out = Path(out_dir)
    trials = read_trials(out)
    meta = _read_json(out / META_FILE) or {}
    trajectories = _read_json(out / TRAJECTORIES_FILE)
    metric = metric or meta.get("metric") or DEFAULT_METRIC
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
        paths.update(_export_best(*best, out, metric, meta))
    images = [p.name for key, p in paths.items() if p.suffix == ".png"]
    paths["summary_md"] = out / SUMMARY_MD_FILE
    paths["summary_md"].write_text(_markdown(summary, metric, meta, best, images))
    return paths
