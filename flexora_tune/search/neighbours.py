"""The subsets Flexora fine-tunes beside its selection, nearest first: the top-j blocks by alpha for the sizes
nearest the selection's, then the next-best subsets by alpha. Plain Python (no Ray), so a plan can be checked
anywhere."""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from itertools import islice

from ..blocks import rank_blocks


def ranked_subsets(alpha: Sequence[float], size: int) -> Iterator[tuple[int, ...]]:
    """Every subset of `size` blocks, best first by total alpha (ties: the earlier blocks of the alpha ranking);
    the first is the top-`size` blocks. Lazy (best-first over positions in the ranking), so asking for a few of
    C(L, size) subsets costs a few steps."""
    order = rank_blocks(alpha)
    if not 0 < size <= len(order):
        return
    values = [float(alpha[b]) for b in order]
    start = tuple(range(size))
    heap = [(-sum(values[p] for p in start), start)]
    queued = {start}
    while heap:
        _, positions = heapq.heappop(heap)
        yield tuple(sorted(order[p] for p in positions))
        for i, p in enumerate(positions):  # move one chosen position one place down the ranking
            nxt = p + 1
            if nxt < len(order) and (i == size - 1 or nxt < positions[i + 1]):
                child = positions[:i] + (nxt,) + positions[i + 1:]
                if child not in queued:
                    queued.add(child)
                    heapq.heappush(heap, (-sum(values[q] for q in child), child))


def sizes_by_distance(k: int, total: int) -> list[int]:
    """Subset sizes 1..`total` nearest `k` first: k-1, k+1, k-2, k+2, ... (k itself excluded)."""
    return [j for d in range(1, total + 1) for j in (k - d, k + d) if 1 <= j <= total]


def alpha_neighbours(selection: Sequence[int], alpha: Sequence[float] | None, total: int
                     ) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(variant, subset) beside `selection`, nearest first, each subset once and never the selection itself:

    1. ``top<j>``: the top-j blocks by alpha for j = k-1, k+1, k-2, k+2, ... (sizes outside 1..L skipped);
    2. then, round by round over the sizes k, k-1, k+1, ...: the next-best subset of each size by alpha
       (``top<j>-<n>``: the n-th best j-block subset), including the top-k blocks when they are not the selection.

    Without a usable `alpha` (one value per block), membership of the selection stands in for it, so top-(k-1)
    lies inside the selection and top-(k+1) contains it.
    """
    chosen = tuple(sorted(selection))
    scores = list(alpha) if alpha is not None and len(alpha) == total else [float(i in chosen) for i in range(total)]
    k = len(chosen)
    seen = {chosen}
    for j in sizes_by_distance(k, total):
        subset = next(ranked_subsets(scores, j))
        if subset not in seen:
            seen.add(subset)
            yield f"top{j}", subset
    streams = {j: enumerate(ranked_subsets(scores, j), start=1) for j in [k, *sizes_by_distance(k, total)]}
    for j in sizes_by_distance(k, total):
        next(streams[j])  # each top-j was offered above
    while streams:
        for j in list(streams):
            for n, subset in streams[j]:
                if subset not in seen:
                    seen.add(subset)
                    yield (f"top{j}" if n == 1 else f"top{j}-{n}"), subset
                    break
            else:
                del streams[j]


def plan_subsets(base: Sequence[tuple[str, tuple[int, ...]]], centre: Sequence[int], alpha: Sequence[float] | None,
                 total: int, count: int) -> list[tuple[str, tuple[int, ...]]]:
    """`count` distinct (variant, subset) entries: `base` first (the searches' selections, the consensus), then
    `alpha_neighbours` of `centre`. Fewer only when the model has fewer non-empty subsets than `count`."""
    plan: list[tuple[str, tuple[int, ...]]] = []
    for variant, subset in base:
        if subset not in {s for _, s in plan}:
            plan.append((variant, tuple(subset)))
    taken = {s for _, s in plan}
    fresh = ((v, s) for v, s in alpha_neighbours(centre, alpha, total) if s not in taken)
    return (plan + list(islice(fresh, max(0, count - len(plan)))))[:count]
