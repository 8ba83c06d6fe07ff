"""Which blocks a search keeps, and when its choice has settled: the selection rules on alpha and the
stop-when-stable criterion."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from ..blocks import rank_blocks
from .settings import RULES


def select_blocks(
    alpha: Sequence[float],
    rule: str = "mean",
    top_k: int | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
) -> tuple[tuple[int, ...], float]:
    """The blocks a rule keeps, and the rule's threshold on alpha.

    ``mean``: alpha above mean(alpha) (gate above 1); ``top_k``: the `top_k` largest (threshold: the smallest
    kept alpha). Then at least `min_blocks` and at most `max_blocks`, taking or dropping by alpha (ties: lower
    index first), so the selection is never empty.
    """
    values = [float(a) for a in alpha]
    total = len(values)
    if total == 0:
        raise ValueError("alpha is empty: there are no blocks to select from")
    if min_blocks > total:
        raise ValueError(f"min_blocks={min_blocks} but the model has only {total} blocks")
    ranked = rank_blocks(values)
    if rule == "mean":
        threshold = math.fsum(values) / total
        chosen = [i for i in range(total) if values[i] > threshold]
    elif rule == "top_k":
        if top_k is None or not 1 <= top_k <= total:
            raise ValueError(f"top_k must be in 1..{total} (the number of blocks), got {top_k}")
        chosen = ranked[:top_k]
        threshold = values[ranked[top_k - 1]]
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    high = total if max_blocks is None else min(max_blocks, total)
    if len(chosen) < min_blocks:
        chosen = ranked[:min_blocks]
    elif len(chosen) > high:
        chosen = ranked[:high]
    return tuple(sorted(chosen)), threshold


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties share their mean rank); 0 when either
    is constant, since a constant sequence has no ranking."""
    if len(a) != len(b):
        raise ValueError(f"rank_correlation needs equally long sequences, got {len(a)} and {len(b)}")
    rho = pd.Series(a, dtype=float).rank().corr(pd.Series(b, dtype=float).rank())
    return 0.0 if math.isnan(rho) else float(rho)


def settled_correlation(
    stable_steps: int, recent_alpha: Sequence[Sequence[float]], window: int, threshold: float
) -> float | None:
    """The stop-when-stable criterion: alpha's rank correlation with `window` steps ago when the selection
    has been unchanged for `stable_steps` >= `window` steps and that correlation is at least `threshold`;
    otherwise None. `recent_alpha` holds alpha after each step, ending with the current one."""
    if stable_steps < window or len(recent_alpha) <= window:
        return None
    rho = rank_correlation(recent_alpha[-1 - window], recent_alpha[-1])
    return rho if rho >= threshold else None
