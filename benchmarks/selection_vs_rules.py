"""Are Flexora's selections a static rule in disguise? Their overlap with the last k and the first k blocks.

Reads the selections `search_signal.py` recorded (`benchmarks/results/search_signal_<task>.csv`, one row per
variant, one subset per seed) and, per variant and rule, the mean Jaccard between each seed's selection and the
rule's k blocks (k = that selection's size), its exact expectation for random subsets of the same sizes, and a
seeded permutation p-value. A selection that agrees across seeds because it is the upper half of the model is
the last-k rule with a search bill; this tells the two apart without a fine-tune.

    .venv/bin/python benchmarks/selection_vs_rules.py default bbc-lm
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, fmt, markdown_table, write_csv  # noqa: E402

from flexora_tune.blocks import parse_blocks  # noqa: E402
from flexora_tune.stability import DRAWS, SEED, expected_jaccard, format_p  # noqa: E402

#: rule name -> the k blocks it adapts in a model of n blocks (as `flexora_tune.search.static` picks them)
RULES: dict[str, Callable[[int, int], frozenset[int]]] = {
    "last-k": lambda k, n: frozenset(range(n - k, n)),
    "first-k": lambda k, n: frozenset(range(k)),
}


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap_test(selections: Sequence[frozenset[int]], rule: Callable[[int, int], frozenset[int]], num_blocks: int,
                 draws: int = DRAWS) -> dict[str, float]:
    """Mean Jaccard of each selection with the rule's subset of its size, against random subsets of those sizes."""
    targets = [rule(len(s), num_blocks) for s in selections]
    observed = float(np.mean([jaccard(s, t) for s, t in zip(selections, targets, strict=True)]))
    expected = float(np.mean([expected_jaccard(len(s), len(s), num_blocks) for s in selections]))
    rng = np.random.default_rng(SEED)
    null = np.zeros(draws)
    for s, t in zip(selections, targets, strict=True):
        mask = np.zeros(num_blocks, dtype=bool)
        mask[list(t)] = True
        drawn = np.argsort(rng.random((draws, num_blocks)), axis=1)[:, : len(s)]
        inter = mask[drawn].sum(axis=1)
        null += inter / (len(s) + len(t) - inter)
    null /= len(selections)
    p = float((1 + np.sum(null >= observed - 1e-12)) / (1 + draws))
    return {"jaccard": observed, "jaccard_random": expected, "p_value": p}


def rows_for(task: str, num_blocks: int) -> list[dict[str, Any]]:
    """One row per variant and rule of `search_signal_<task>.csv`."""
    path = RESULTS / f"search_signal_{task}.csv"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run benchmarks/search_signal.py --task {task} first")
    rows = []
    with path.open() as handle:
        for record in csv.DictReader(handle):
            selections = [frozenset(parse_blocks(part) or ())
                          for part in record["selections"].split(";") if part.strip()]
            for name, rule in RULES.items():
                rows.append({"task": task, "variant": record["variant"], "rule": name, "seeds": len(selections),
                             **overlap_test(selections, rule, num_blocks),
                             "agreement_across_seeds": float(record["jaccard"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", help="tasks whose search_signal_<task>.csv to read")
    parser.add_argument("--num-blocks", type=int, default=30, help="blocks in the model (default 30)")
    args = parser.parse_args(argv)
    rows = [row for task in args.tasks for row in rows_for(task, args.num_blocks)]
    write_csv(RESULTS / "selection_vs_rules.csv", rows)
    table = markdown_table(
        ["task", "search", "rule", "seeds", "Jaccard with the rule", "random subsets", "p", "agreement across seeds"],
        [[r["task"], r["variant"], r["rule"], r["seeds"], fmt(r["jaccard"], 3), fmt(r["jaccard_random"], 3),
          format_p(r["p_value"]), fmt(r["agreement_across_seeds"], 3)] for r in rows])
    text = (f"# Flexora's selections against static rules\n\n`{command_line()}`\n\n"
            "Per search variant: the mean Jaccard between each seed's selection and the rule's blocks of the same "
            "size, against random subsets of those sizes (exact expectation; permutation p, "
            f"{DRAWS} seeded draws). Agreement across seeds is the mean pairwise Jaccard from the same CSV.\n\n"
            f"{table}\n")
    (RESULTS / "selection_vs_rules.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
