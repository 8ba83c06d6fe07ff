"""Is a Flexora selection signal or noise? Two measures, numpy only.

Per search, `alpha_separation`: how far alpha has moved apart, in units of what Adam steps of pure noise reach
in the same number of steps. Across searches (the search seeds of a comparison), `search_agreement`: the mean
pairwise Jaccard of the selections, and of the top-k blocks by alpha, against random subsets of the same sizes,
with its exact expectation and a seeded permutation p-value.

A search can separate its gates strongly and still agree with no other seed (it learned its own seed's noise
consistently); agreement across seeds is the test that the selection is a property of the model and task.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .blocks import top_k_blocks

#: A search whose separation reaches this is called separated (pure noise gives about 1).
SEPARATED = 3.0
#: Agreement beyond chance needs a permutation p-value below this.
SIGNIFICANCE = 0.05
#: Random draws of the permutation test, and its seed (fixed, so a report is reproducible).
DRAWS = 10_000
SEED = 0
_CHUNK = 1_000
_TOLERANCE = 1e-9


def alpha_separation(alpha: Sequence[float], steps: int, alpha_lr: float,
                     start: Sequence[float] | None = None) -> float:
    """How far alpha has separated: ``S = std_b(alpha_b - start_b) / (alpha_lr * sqrt(steps))``.

    The numerator is the spread of alpha's net movement across blocks (population std; `start` defaults to
    the gates' initial alpha, all zeros). The denominator is the spread that noise alone produces: Adam
    normalises every gradient by its running scale, so a gate whose gradient is pure noise walks about
    `alpha_lr` per step in a random direction and ends about ``alpha_lr * sqrt(steps)`` from its start,
    whatever the gradient's size. A gate whose gradient keeps one sign moves about `alpha_lr` every step,
    ``alpha_lr * steps`` in all. So:

    - S about 1 (0.5 to 1.5 for a handful of blocks): alpha's spread is what noise gives; the selection is
      whatever the last batches pushed;
    - S >= `SEPARATED` (3): separated, the blocks moved apart consistently;
    - S is at most about ``sqrt(steps)`` (every step pushing every block the same way), so a search of fewer
      than 9 steps can never count as separated, and a 12-step one only just (at most 3.5).

    Why not alpha's own step-to-step changes as the noise: Adam's momentum smooths noisy steps, so their std
    is small against the walk they add up to; with pure-noise gradients the spread over that std is about 12
    after 12 steps and 55 after 200, i.e. it grows with the search and cannot tell noise from signal.
    """
    if steps < 1:
        raise ValueError(f"separation needs at least one step, got {steps}")
    if not alpha_lr > 0:
        raise ValueError(f"alpha_lr must be > 0, got {alpha_lr}")
    moved = np.asarray(alpha, dtype=float) - (0.0 if start is None else np.asarray(start, dtype=float))
    if moved.ndim != 1 or moved.size == 0:
        raise ValueError(f"alpha must be a non-empty list of one value per block, got shape {moved.shape}")
    return float(moved.std() / (alpha_lr * math.sqrt(steps)))


def separation_verdict(separation: float) -> str:
    """``"separated (S=5.4)"`` at or above `SEPARATED`, else ``"not separated (S=1.2; noise gives about 1)"``."""
    if separation >= SEPARATED:
        return f"separated (S={separation:.1f})"
    return f"not separated (S={separation:.1f}; noise gives about 1)"


def _sets(selections: Sequence[Sequence[int]], num_blocks: int) -> list[frozenset[int]]:
    sets = [frozenset(int(b) for b in s) for s in selections]
    for s in sets:
        if not s or min(s) < 0 or max(s) >= num_blocks:
            raise ValueError(f"a selection must be a non-empty subset of 0..{num_blocks - 1}, got {sorted(s)}")
    return sets


def mean_pairwise_jaccard(selections: Sequence[Sequence[int]]) -> float:
    """The mean over all pairs of selections of ``|A & B| / |A | B|`` (needs at least two)."""
    sets = [frozenset(s) for s in selections]
    if len(sets) < 2:
        raise ValueError(f"agreement needs at least two selections, got {len(sets)}")
    return statistics.fmean(len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2))


def expected_jaccard(a: int, b: int, num_blocks: int) -> float:
    """The exact expected Jaccard of two independent uniformly random subsets of sizes `a` and `b` of
    `num_blocks` blocks: their overlap I is hypergeometric, so ``E = sum_i C(a,i) C(L-a,b-i) / C(L,b) *
    i / (a + b - i)`` over the possible overlaps i."""
    if not (1 <= a <= num_blocks and 1 <= b <= num_blocks):
        raise ValueError(f"subset sizes must lie in 1..{num_blocks}, got {a} and {b}")
    total = math.comb(num_blocks, b)
    return math.fsum(math.comb(a, i) * math.comb(num_blocks - a, b - i) / total * i / (a + b - i)
                     for i in range(max(0, a + b - num_blocks), min(a, b) + 1))


def expected_mean_pairwise_jaccard(sizes: Sequence[int], num_blocks: int) -> float:
    """The expected mean pairwise Jaccard of independent random subsets with these `sizes` (exact: by
    linearity, the mean of `expected_jaccard` over the pairs)."""
    if len(sizes) < 2:
        raise ValueError(f"agreement needs at least two selections, got {len(sizes)}")
    return statistics.fmean(expected_jaccard(a, b, num_blocks) for a, b in itertools.combinations(sizes, 2))


def random_mean_pairwise_jaccards(sizes: Sequence[int], num_blocks: int, draws: int = DRAWS,
                                  seed: int = SEED) -> np.ndarray:
    """The null distribution: `draws` values of the mean pairwise Jaccard of independent uniformly random
    subsets with the given `sizes`, drawn with ``numpy.random.default_rng(seed)`` (the same numbers on
    every machine)."""
    sizes_array = np.asarray(sizes, dtype=int)
    n = len(sizes_array)
    if n < 2 or draws < 1:
        raise ValueError(f"the null needs at least two sizes and one draw, got {n} sizes and {draws} draws")
    rng = np.random.default_rng(seed)
    upper = np.triu_indices(n, k=1)
    out = []
    for start in range(0, draws, _CHUNK):
        chunk = min(_CHUNK, draws - start)
        ranks = rng.random((chunk, n, num_blocks)).argsort(axis=2).argsort(axis=2)
        member = (ranks < sizes_array[None, :, None]).astype(np.float64)
        overlap = member @ member.transpose(0, 2, 1)
        union = sizes_array[:, None] + sizes_array[None, :] - overlap
        out.append((overlap / union)[:, upper[0], upper[1]].mean(axis=1))
    return np.concatenate(out)


@dataclass(frozen=True)
class AgreementTest:
    """How much a set of selections agree, against random subsets of the same sizes.

    `observed` is their mean pairwise Jaccard, `expected` its exact expectation for random subsets
    (`expected_mean_pairwise_jaccard`), `p_value` the one-sided permutation p-value: the share of `draws`
    random draws (`random_mean_pairwise_jaccards`, seed `seed`) whose mean pairwise Jaccard is at least
    `observed`, counting the observed selections as one more draw, so ``p = (1 + #{null >= observed}) /
    (1 + draws)`` and never below ``1 / (1 + draws)``."""

    observed: float
    expected: float
    p_value: float
    sizes: tuple[int, ...]
    num_blocks_total: int
    draws: int
    seed: int

    @property
    def beyond_chance(self) -> bool:
        """Agreement above the random expectation at p < `SIGNIFICANCE`."""
        return self.p_value < SIGNIFICANCE and self.observed > self.expected

    @property
    def verdict(self) -> str:
        """``"agree beyond chance (p=0.01)"`` or ``"no more agreement than random subsets (p=0.4)"``."""
        words = "agree beyond chance" if self.beyond_chance else "no more agreement than random subsets"
        return f"{words} ({format_p(self.p_value)})"

    def to_dict(self) -> dict[str, Any]:
        return {"observed": self.observed, "expected": self.expected, "p_value": self.p_value,
                "verdict": self.verdict, "sizes": list(self.sizes), "num_blocks_total": self.num_blocks_total,
                "draws": self.draws, "seed": self.seed}


def format_p(p: float) -> str:
    """``p<0.001`` below a thousandth, else two significant digits: ``p=0.012``, ``p=0.4``."""
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def agreement_test(selections: Sequence[Sequence[int]], num_blocks_total: int, draws: int = DRAWS,
                   seed: int = SEED) -> AgreementTest:
    """The `AgreementTest` of `selections` (at least two non-empty subsets of ``0..num_blocks_total-1``)."""
    sets = _sets(selections, num_blocks_total)
    sizes = tuple(len(s) for s in sets)
    observed = mean_pairwise_jaccard(sets)
    null = random_mean_pairwise_jaccards(sizes, num_blocks_total, draws, seed)
    p_value = (1 + int((null >= observed - _TOLERANCE).sum())) / (1 + draws)
    return AgreementTest(observed, expected_mean_pairwise_jaccard(sizes, num_blocks_total), p_value, sizes,
                         num_blocks_total, draws, seed)


def common_k(sizes: Sequence[int]) -> int:
    """The one k the top-k comparison uses by default: the median selection size, halves rounded up."""
    return math.floor(statistics.median(sizes) + 0.5)


@dataclass(frozen=True)
class SearchAgreement:
    """The agreement of several searches (one per search seed): of their `selections` and, given their
    final alphas, of their `top_k` blocks by alpha with one common `k` (so selections of different sizes
    compare like with like), plus each search's `separations` (`alpha_separation`) where known."""

    selections: AgreementTest
    blocks: tuple[tuple[int, ...], ...]
    top_k: AgreementTest | None = None
    k: int | None = None
    separations: tuple[float, ...] = ()

    @property
    def n_searches(self) -> int:
        return len(self.blocks)

    def line(self, label: str = "search") -> str:
        """One line: ``flexora searches (5 seeds): Jaccard 0.467 vs 0.333 for random subsets of the same sizes,
        p=0.02: agree beyond chance; top-4 by alpha 0.520 vs 0.310, p=0.004; median separation 1.4 (0/5
        searches separated)``."""
        s = self.selections
        words = "agree beyond chance" if s.beyond_chance else "no more agreement than random subsets"
        text = (f"{label} searches ({self.n_searches} seeds): Jaccard {s.observed:.3f} vs {s.expected:.3f} for "
                f"random subsets of the same sizes, {format_p(s.p_value)}: {words}")
        if self.top_k is not None:
            t = self.top_k
            text += f"; top-{self.k} by alpha {t.observed:.3f} vs {t.expected:.3f}, {format_p(t.p_value)}"
        if self.separations:
            separated = sum(v >= SEPARATED for v in self.separations)
            text += (f"; median separation {statistics.median(self.separations):.1f} "
                     f"({separated}/{len(self.separations)} searches separated)")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"n_searches": self.n_searches, "blocks": [list(b) for b in self.blocks],
                "selections": self.selections.to_dict(), "k": self.k,
                "top_k": None if self.top_k is None else self.top_k.to_dict(),
                "separations": list(self.separations), "separated_at": SEPARATED, "significance": SIGNIFICANCE}


def search_agreement(
    selections: Sequence[Sequence[int]], num_blocks_total: int, alphas: Sequence[Sequence[float]] | None = None,
    k: int | None = None, separations: Sequence[float] = (), draws: int = DRAWS, seed: int = SEED,
) -> SearchAgreement:
    """The `SearchAgreement` of searches that chose `selections` (one per search seed, at least two) and,
    optionally, ended with `alphas` (one value per block each): the top-k comparison uses `k` blocks per
    search, by default `common_k` of the selections' sizes (ties in alpha: the lower block, as
    `blocks.top_k_blocks`). Both tests use the same `draws` and `seed`."""
    sets = _sets(selections, num_blocks_total)
    blocks = tuple(tuple(sorted(s)) for s in sets)
    test = agreement_test(blocks, num_blocks_total, draws, seed)
    top, chosen_k = None, None
    if alphas is not None:
        if len(alphas) != len(blocks) or any(len(a) != num_blocks_total for a in alphas):
            raise ValueError(f"need one alpha of {num_blocks_total} values per selection ({len(blocks)})")
        chosen_k = common_k(test.sizes) if k is None else k
        if not 1 <= chosen_k <= num_blocks_total:
            raise ValueError(f"k must be in 1..{num_blocks_total}, got {chosen_k}")
        top = agreement_test([top_k_blocks(a, chosen_k) for a in alphas], num_blocks_total, draws, seed)
    return SearchAgreement(test, blocks, top, chosen_k, tuple(float(v) for v in separations))
