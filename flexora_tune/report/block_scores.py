"""Do the probes rank the blocks as Flexora does? Each strategy's per-block scores side by side, read from the
trials table alone.

Flexora's scores are the final ``alpha`` of its finished search trials (stage ``search``); a probe's
(``lora-norm``, ``grad-norm``) are the ``probe_scores`` of its finished probe trial (stage ``probe``). Scores of
different kinds are on no common scale (alpha is a logit, a probe's score a norm), and neither are one strategy's
seeds, so each trial's scores become ranks first (1 = lowest, L = highest; ties share their mean rank), and those
are averaged over seeds. Each probe's mean ranks are compared with the search's by Spearman's rank correlation
(`flexora.selection.rank_correlation`). `write_report` draws them as ``block_scores.png``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..flexora.selection import rank_correlation
from ..results import PROBE_SCORES, PROBE_STAGE
from .agreement import SEARCH_STAGE, UNFINISHED, block_values
from .plots import block_ticks, new_figure, save_figure

#: The column holding each stage's per-block scores.
SCORE_COLUMNS: dict[str, str] = {SEARCH_STAGE: "alpha", PROBE_STAGE: PROBE_SCORES}
#: The search strategy the probes are compared with when the table has it (else the first search strategy).
REFERENCE_SEARCH = "flexora"
#: Above this many blocks the figure's cells carry no numbers.
MAX_ANNOTATED_BLOCKS = 24


def block_score_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (strategy, seed) with per-block scores: its last-started finished search trial with a
    readable ``alpha``, or probe trial with readable ``probe_scores``. Columns ``strategy``, ``seed``,
    ``stage``, ``num_blocks_total``, ``trial_id`` and ``scores`` (a list of floats, one per block); empty when
    the table has none."""
    columns = ["strategy", "seed", "stage", "num_blocks_total", "trial_id", "scores"]
    if "stage" not in trials.columns:
        return pd.DataFrame(columns=columns)
    df = trials.reset_index(drop=True)
    stage = df["stage"].astype(str).str.strip().str.lower()
    status = df["status"].fillna("").astype(str).str.strip().str.upper()
    total = pd.to_numeric(df["num_blocks_total"], errors="coerce")
    start = pd.to_numeric(df["start_time"], errors="coerce")
    found = []
    for i in df.index[stage.isin(list(SCORE_COLUMNS)) & ~status.isin(UNFINISHED) & total.notna()]:
        column = SCORE_COLUMNS[stage[i]]
        scores = block_values(df.at[i, column], int(total[i])) if column in df.columns else None
        if scores is not None:
            found.append({"strategy": str(df.at[i, "strategy"]), "seed": df.at[i, "seed"], "stage": stage[i],
                          "num_blocks_total": int(total[i]), "trial_id": str(df.at[i, "trial_id"]),
                          "scores": scores, "_start": start[i], "_order": i})
    if not found:
        return pd.DataFrame(columns=columns)
    rows = pd.DataFrame(found).sort_values(["_start", "_order"], na_position="first", kind="stable")
    rows = rows.groupby(["strategy", "seed"], sort=True).tail(1).sort_values(["strategy", "seed"], kind="stable")
    return rows[columns].reset_index(drop=True)


def block_ranks(scores: list[float]) -> list[float]:
    """Each block's rank among one trial's scores: 1 for the lowest, L for the highest, ties at their mean."""
    return [float(r) for r in pd.Series(scores, dtype=float).rank(method="average")]


@dataclass(frozen=True)
class BlockScores:
    """Per-block scores of a comparison's searches and probes, as ranks averaged over seeds."""

    ranks: pd.DataFrame
    """Mean rank per block (columns 0..L-1), one row per strategy (index): searches first, then probes."""
    stages: dict[str, str]
    """Strategy -> ``search`` or ``probe``."""
    seeds: dict[str, int]
    """Strategy -> how many seeds its mean is over."""
    reference: str | None
    """The search strategy the probes are compared with; None without a search."""
    correlations: dict[str, float]
    """Probe strategy -> Spearman correlation of its mean ranks with the reference's; empty without one."""

    @property
    def num_blocks(self) -> int:
        """L, the blocks each row scores."""
        return int(self.ranks.shape[1])

    def labels(self) -> list[str]:
        """One label per row of `ranks`: strategy, what was scored and over how many seeds, and a probe's ρ."""
        labels = []
        for strategy in self.ranks.index:
            scored = "final alpha" if self.stages[strategy] == SEARCH_STAGE else "probe scores"
            label = f"{strategy}: {scored}, {self.seeds[strategy]} seed{'s' if self.seeds[strategy] != 1 else ''}"
            if strategy in self.correlations:
                label += f"\nρ = {self.correlations[strategy]:+.2f} vs {self.reference}"
            labels.append(label)
        return labels


def block_scores(trials: pd.DataFrame) -> BlockScores | None:
    """The comparison's per-block scores (`block_score_rows`) as mean ranks over seeds, with each probe's
    Spearman correlation against the search's mean ranks (`REFERENCE_SEARCH` when it ran, else the first search
    strategy by name). None when no search or probe row has scores. Rows of another block count than the most
    common one are left out, with a warning."""
    rows = block_score_rows(trials)
    if rows.empty:
        return None
    counts = rows["num_blocks_total"].value_counts()
    total = int(counts.index[0])
    if len(counts) > 1:
        dropped = sorted(rows.loc[rows["num_blocks_total"] != total, "trial_id"])
        warnings.warn(f"block scores: trials {dropped} score another number of blocks than {total}; left out",
                      stacklevel=2)
        rows = rows[rows["num_blocks_total"] == total]
    rows = rows.assign(_probe=rows["stage"] != SEARCH_STAGE)  # searches first
    order = rows.sort_values(["_probe", "strategy"], kind="stable")["strategy"].drop_duplicates().tolist()
    ranks = pd.DataFrame({s: np.mean([block_ranks(v) for v in rows.loc[rows["strategy"] == s, "scores"]], axis=0)
                          for s in order}).T
    ranks.columns = range(total)
    stages = {s: str(rows.loc[rows["strategy"] == s, "stage"].iloc[0]) for s in order}
    seeds = {s: int((rows["strategy"] == s).sum()) for s in order}
    searches = [s for s in order if stages[s] == SEARCH_STAGE]
    reference = REFERENCE_SEARCH if REFERENCE_SEARCH in searches else (searches[0] if searches else None)
    correlations = {} if reference is None else {
        s: rank_correlation(list(ranks.loc[s]), list(ranks.loc[reference])) for s in order if stages[s] == PROBE_STAGE
    }
    return BlockScores(ranks, stages, seeds, reference, correlations)


def plot_block_scores(trials: pd.DataFrame, path: str | Path) -> Path | None:
    """Per-block scores of the searches (final alpha) and probes (``probe_scores``) side by side: one row per
    strategy, one column per block, coloured by the mean over seeds of each trial's score ranks (L = the
    highest score, red; 1 = the lowest, blue). A probe's label gives its Spearman ρ with the search's row.
    Returns None, drawing nothing, when no search or probe trial has per-block scores (`block_scores`)."""
    found = block_scores(trials)
    if found is None:
        return None
    total, ranks = found.num_blocks, found.ranks.to_numpy(dtype=float)
    fig = new_figure(max(8.0, 5.0 + 0.35 * total), 2.2 + 0.55 * len(ranks))
    ax = fig.add_subplot()
    top = max(total, 2)
    mesh = ax.imshow(ranks, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=1, vmax=top)
    if total <= MAX_ANNOTATED_BLOCKS:
        for (i, b), value in np.ndenumerate(ranks):
            dark = abs(value - (1 + top) / 2) > 0.35 * (top - 1)
            ax.text(b, i, f"{value:.1f}".removesuffix(".0"), ha="center", va="center", fontsize="x-small",
                    color="white" if dark else "black")
    ax.set_xticks(range(total) if total <= MAX_ANNOTATED_BLOCKS else block_ticks(total))
    ax.set_yticks(range(len(ranks)), found.labels(), fontsize="small")
    ax.set_xlabel("block index")
    fig.colorbar(mesh, ax=ax, label=f"mean rank ({total} = highest)")
    fig.suptitle("Per-block scores: rank within each trial (1 = lowest), mean over seeds\n"
                 "searches: final alpha; probes: probe_scores; ρ: Spearman of the mean ranks", fontsize="medium")
    return save_figure(fig, path)
