"""The report's plots: best-so-far against compute, Flexora's gates during search, and which blocks each
seed's winner adapted.

matplotlib's object API with the Agg canvas: no pyplot, no global backend change.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..blocks import parse_blocks
from ..results import DEFAULT_METRIC, Mode, infer_mode
from .compute import finetune_equivalents
from .tables import best_per_seed
from .trials import eligible, in_time_order, prepare_trials

_KNOWN_COLORS = {
    "flexora": "#d62728", "random": "#1f77b4", "tpe": "#2ca02c", "all": "#7f7f7f",
    "first-k": "#9467bd", "last-k": "#8c564b",
}
_EXTRA_COLORS = ("#ff7f0e", "#17becf", "#bcbd22", "#e377c2", "#393b79", "#637939", "#843c39", "#7b4173")
#: The best-so-far plot's x labels: compute in fine-tune equivalents when the trials have FLOPs, else seconds.
FT_AXIS_LABEL = "cumulative compute (fine-tune equivalents: FLOPs / one all-blocks fine-tune), search included"
SECONDS_AXIS_LABEL = "cumulative compute (s), search trials included"
_FLOOR_STYLES = ("--", ":", "-.")


def strategy_colors(strategies: Iterable[str]) -> dict[str, str]:
    """A fixed colour per strategy name, the same in every plot."""
    colors: dict[str, str] = {}
    extra = iter(_EXTRA_COLORS * 4)
    for name in sorted(set(strategies)):
        colors[name] = _KNOWN_COLORS.get(name) or next(extra, "#000000")
    return colors


def new_figure(width: float, height: float) -> Any:
    """An Agg-backed matplotlib `Figure` of `width` x `height` inches with a constrained layout (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (creating its folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def _best_so_far_steps(group: pd.DataFrame, metric: str, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative compute (the ``_x`` column) after each trial and the best metric value reached by then (NaN
    before any)."""
    ordered = in_time_order(group)
    x = ordered["_x"].fillna(0.0).cumsum().to_numpy(dtype=float)
    values = ordered[metric].where(eligible(ordered, metric))
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


def best_so_far_axis(trials: pd.DataFrame) -> tuple[pd.Series, str]:
    """Each trial's compute on the best-so-far plot's x axis, and the axis label: fine-tune equivalents
    (`finetune_equivalents`) when every seed has them, else compute seconds (with a warning when the table has
    ``flops`` but some seed has no unit)."""
    ft = finetune_equivalents(trials)
    if ft is not None:
        if bool(ft.notna().groupby(trials["seed"], dropna=False).any().all()):
            return ft, FT_AXIS_LABEL
        warnings.warn("some seeds have no fine-tune equivalents (no finished fine-tune with flops); the "
                      "best-so-far plot uses compute seconds", stacklevel=3)
    return pd.to_numeric(trials["compute_s"], errors="coerce"), SECONDS_AXIS_LABEL


def plot_best_so_far(
    trials: pd.DataFrame, path: str | Path, metric: str = DEFAULT_METRIC, mode: Mode | None = None,
    floors: Mapping[str, float] | None = None,
) -> Path:
    """Best-so-far `metric` against cumulative compute (search trials included), one line per strategy.

    Compute is in fine-tune equivalents (`finetune_equivalents`: FLOPs over one all-blocks fine-tune of the
    same seed) when the trials have ``flops`` for every seed, else in compute seconds; the x label says which.

    Each seed's curve (thin) is a step function over its trials in start order; the thick line is the median
    over seeds and the band the min-max over seeds, both drawn from the compute at which every seed with a
    result has one, ending in a dot with a min-max bar. Seeds without any successful trial are left out (the
    legend counts them).

    `floors` (floor name -> its `metric` value, `floors.Floors.values`) are drawn as horizontal lines: what a
    strategy must rise above before its curve means anything.
    """
    mode = mode or infer_mode(metric)
    df = prepare_trials(trials, metric)
    df["_x"], xlabel = best_so_far_axis(df)
    colors = strategy_colors(df["strategy"])
    fig = new_figure(8.0, 5.0)
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
    for (name, value), style in zip((floors or {}).items(), _FLOOR_STYLES * 4, strict=False):
        ax.axhline(value, color="black", lw=1.2, linestyle=style, label=f"{name} floor ({value:.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"best {metric} so far")
    ax.set_title(f"Best-so-far {metric} vs compute\n"
                 "(thin: each seed; thick: median over seeds; band: min-max over seeds)")
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right" if mode == "max" else "upper right", fontsize="small")
    return save_figure(fig, path)


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
    fig = new_figure(5.5 * ncols + 1.0, 3.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    mesh = None
    for ax, (trial_id, record, steps, gates) in zip(axes.flat, panels, strict=False):
        mesh = ax.pcolormesh(steps, np.arange(gates.shape[0]), gates, cmap="RdBu_r", norm=norm, shading="nearest")
        ax.set_title(f"{record.get('strategy', 'flexora')} seed {record.get('seed', '?')} ({trial_id})",
                     fontsize="medium")
        ax.set_xlabel("search step")
        ax.set_ylabel("block")
        ax.set_yticks(block_ticks(gates.shape[0]))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(mesh, ax=axes, label="gate g = L·softmax(α)  (1 = uniform)")
    fig.suptitle("Flexora gates per block during search")
    return save_figure(fig, path)


def block_ticks(num_blocks: int) -> list[int]:
    """Block indices to label on an axis of `num_blocks` blocks: every one, or every n-th for at most 16."""
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
    fig = new_figure(max(7.0, 3.5 + 0.3 * total), 1.6 + 0.32 * len(per_seed))
    ax = fig.add_subplot()
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, total), minor=True)
    ax.set_yticks(np.arange(-0.5, len(per_seed)), minor=True)
    ax.grid(which="minor", color="#cccccc", lw=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks(block_ticks(total))
    labels = [f"{'★ ' if i == winner else ''}{r.strategy} · seed {r.seed}" for i, r in enumerate(per_seed.itertuples())]
    ax.set_yticks(range(len(per_seed)), labels)
    for i, row in enumerate(per_seed.itertuples(index=False)):
        note = "no successful trial" if pd.isna(row.best_val) else f"{row.best_val:.3f}  ({row.num_blocks}/{total})"
        ax.annotate(note, (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize="small")
    ax.annotate(f"{metric} (blocks)", (1.01, -0.5), xycoords=("axes fraction", "data"), va="bottom",
                fontsize="small", fontweight="bold")
    ax.set_xlabel("block index")
    ax.set_title(f"Blocks with LoRA in each seed's best trial\n(chosen by {metric}; ★ = overall best)")
    return save_figure(fig, path)


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
