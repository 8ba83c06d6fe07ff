"""`summarize`'s table as text: the terminal table, the Markdown table and the whole ``summary.md``.

Every header names the metric the winner was chosen by and its paired test metric, never a fixed name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from ..blocks import BlockSelection, compact_blocks, parse_blocks
from ..results import BEST_LORA_CONFIG_DIR, BEST_SELECTION_FILE, DEFAULT_METRIC
from .trials import paired_test_metric


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
            f"{compact_blocks(blocks)} ({len(blocks)})" if blocks else "-",
            f"{r.n_seeds_ok}/{r.n_seeds}",
            str(r.n_trials),
            str(r.n_errors),
        ])
    return header, rows


def format_summary(summary: pd.DataFrame, metric: str = DEFAULT_METRIC) -> str:
    """A fixed-width text table of `summarize`'s result for the terminal (means ± std over seeds).

    Pass the `metric` the summary was made with: it names the value columns.
    """
    header, rows = _display_rows(summary, metric)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_markdown(summary: pd.DataFrame, metric: str = DEFAULT_METRIC) -> str:
    """`summarize`'s result as a Markdown table (means ± std over seeds); `metric` names the value columns."""
    header, rows = _display_rows(summary, metric)
    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def summary_document(
    summary: pd.DataFrame, metric: str, meta: Mapping[str, Any], best: tuple[BlockSelection, pd.Series] | None,
    images: Iterable[str],
) -> str:
    """The text of ``summary.md``: title from meta, the selection rule, the table, the winner and the plots."""
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
            f"**Best selection:** blocks {compact_blocks(selection.blocks)} ({len(selection)} of "
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
