"""`summarize`'s table as text: the terminal table, the Markdown table and the whole ``summary.md``.

Every header names the metric the winner was chosen by and its paired test metric, never a fixed name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from ..blocks import BlockSelection, compact_blocks, parse_blocks
from ..results import BEATS_MAJORITY_CLASS, BEST_LORA_CONFIG_DIR, BEST_SELECTION_FILE, DEFAULT_METRIC
from .floor_rows import below_marker, flag, floor_notes, floor_warning, is_floor
from .paired import CONFIDENCE, MIN_PAIRS, REFERENCE_VERDICT, no_reference
from .trials import paired_test_metric


def _pm(mean: Any, std: Any, digits: int) -> str:
    """``0.873 ± 0.012``; just the mean when std is NaN; ``-`` when the mean is missing."""
    if mean is None or pd.isna(mean):
        return "-"
    if std is None or pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _paired(mean: Any, low: Any, high: Any, verdict: Any) -> str:
    """``+0.012 [-0.004, +0.028] no difference``; without an interval just the mean; without a mean the verdict."""
    verdict = "-" if verdict is None or pd.isna(verdict) else str(verdict)
    if verdict == REFERENCE_VERDICT or mean is None or pd.isna(mean):
        return verdict
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{mean:+.3f} {verdict}"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] {verdict}"


def _count(value: Any) -> str:
    """A count cell as an integer (a CSV with floor rows reads counts back as floats)."""
    return "-" if value is None or pd.isna(value) else str(int(value))


def _blocks(value: Any) -> tuple[int, ...] | None:
    """A ``blocks_of_best`` cell's blocks; a single block reads back from CSV as a number (1, or 1.0 beside an
    empty cell)."""
    if isinstance(value, int | float) and not pd.isna(value) and float(value).is_integer():
        value = str(int(value))
    return parse_blocks(value)


def summary_reference(summary: pd.DataFrame) -> str | None:
    """The reference strategy of `summarize`'s paired columns, or None when the summary has none (an older
    ``summary.csv``)."""
    if "reference" not in summary.columns or "val_verdict" not in summary.columns:
        return None
    names = summary["reference"].dropna()
    return str(names.iloc[0]) if len(names) else None


def reference_missing(summary: pd.DataFrame) -> bool:
    """Whether the summary's reference strategy was not run, so it holds no paired verdicts."""
    reference = summary_reference(summary)
    strategies = summary[~is_floor(summary)]
    return reference is not None and bool((strategies["val_verdict"] == no_reference(reference)).all())


def _has_ft(summary: pd.DataFrame) -> bool:
    return "total_compute_ft" in summary.columns and bool(summary["total_compute_ft"].notna().any())


def _display_rows(summary: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the Markdown and terminal tables: the compute columns in
    fine-tune equivalents when the summary has them, and the paired verdicts when its reference was run.
    Floor rows come last, named ``<floor> (floor)``, with only their values (``n/a`` where they have none); a
    strategy that does not beat the majority-class floor has its value marked."""
    test_metric = paired_test_metric(metric)
    with_ft = _has_ft(summary)
    reference = None if reference_missing(summary) else summary_reference(summary)
    header = [
        "strategy", f"best {metric}", f"{test_metric} of best", "compute to best (s)", "total compute (s)",
        "blocks of best", "seeds ok", "trials", "errors",
    ]
    if with_ft:
        header += ["compute to best (ft)", "total compute (ft)"]
    if reference is not None:
        header += [f"Δ {test_metric} vs {reference}", f"Δ {metric} vs {reference}"]
    rows = []
    floors = is_floor(summary).to_numpy()
    below = below_marker(metric)
    for r, floor in zip(summary.itertuples(index=False), floors, strict=True):
        if floor:
            cells = [f"{r.strategy} (floor)", *("n/a" if pd.isna(v) else f"{v:.3f}"
                                                 for v in (r.best_val_mean, r.test_of_best_mean))]
            rows.append(cells + ["-"] * (len(header) - len(cells)))
            continue
        blocks = _blocks(r.blocks_of_best)
        marked = flag(getattr(r, BEATS_MAJORITY_CLASS, None)) is False and not pd.isna(r.best_val_mean)
        cells = [
            str(r.strategy),
            _pm(r.best_val_mean, r.best_val_std, 3) + (f" {below}" if marked else ""),
            _pm(r.test_of_best_mean, r.test_of_best_std, 3),
            _pm(r.compute_to_best_mean, None, 1),
            _pm(r.total_compute_mean, None, 1),
            f"{compact_blocks(blocks)} ({len(blocks)})" if blocks else "-",
            f"{_count(r.n_seeds_ok)}/{_count(r.n_seeds)}",
            _count(r.n_trials),
            _count(r.n_errors),
        ]
        if with_ft:
            cells += [_pm(r.compute_to_best_ft, None, 2), _pm(r.total_compute_ft, None, 2)]
        if reference is not None:
            cells += [_paired(r.test_diff_mean, r.test_diff_lo, r.test_diff_hi, r.test_verdict),
                      _paired(r.val_diff_mean, r.val_diff_lo, r.val_diff_hi, r.val_verdict)]
        rows.append(cells)
    return header, rows


def format_summary(summary: pd.DataFrame, metric: str = DEFAULT_METRIC) -> str:
    """A fixed-width text table of `summarize`'s result for the terminal (means ± std over seeds).

    Pass the `metric` the summary was made with: it names the value columns. The paired columns read
    ``+0.012 [-0.004, +0.028] no difference``: the mean per-seed difference from the reference, its 95% interval
    and the verdict. Floor rows follow a second rule; the notes on the floors and, when no strategy beats the
    majority-class floor, the warning (`floor_rows.floor_warning`) close the table.
    """
    header, rows = _display_rows(summary, metric)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    first_floor = int((~is_floor(summary)).sum())
    lines = [line(header), rule, *(line(r) for r in rows[:first_floor])]
    if first_floor < len(rows):
        lines += [rule, *(line(r) for r in rows[first_floor:])]
    if reference_missing(summary):
        lines.append(f"(no paired verdicts: the reference strategy {summary_reference(summary)!r} was not run)")
    lines += [note.replace("`", "") for note in floor_notes(summary, metric)]
    warning = floor_warning(summary, metric)
    return "\n".join([*lines, warning] if warning else lines)


def format_markdown(summary: pd.DataFrame, metric: str = DEFAULT_METRIC) -> str:
    """`summarize`'s result as a Markdown table (means ± std over seeds); `metric` names the value columns."""
    header, rows = _display_rows(summary, metric)
    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def paired_note(summary: pd.DataFrame, metric: str) -> str | None:
    """The sentence of ``summary.md`` that says how the paired columns were made (None without them)."""
    reference = summary_reference(summary)
    if reference is None:
        return None
    if reference_missing(summary):
        return (f"No paired verdicts: the reference strategy `{reference}` was not run (choose another with "
                "`--reference`).")
    level = round(100 * CONFIDENCE)
    return (f"Δ columns: the paired difference from `{reference}`, seed by seed (same seed, same data order), of "
            f"the chosen trial's `{paired_test_metric(metric)}` and `{metric}`: mean [{level}% Student t interval "
            f"over seeds] and the verdict at {level}% (better, worse or no difference, by `{metric}`'s direction). "
            f"Fewer than {MIN_PAIRS} paired seeds give no verdict.")


def summary_document(
    summary: pd.DataFrame, metric: str, meta: Mapping[str, Any], best: tuple[BlockSelection, pd.Series] | None,
    images: Iterable[str], notes: Iterable[str] = (),
) -> str:
    """The text of ``summary.md``: title from meta, the selection rule, the table, what its paired and compute
    columns mean (`notes` adds sentences, e.g. what one fine-tune equivalent is), the winner and the plots."""
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
    warning = floor_warning(summary, metric)
    lines += [f"{note}\n" for note in (paired_note(summary, metric), *floor_notes(summary, metric), *notes) if note]
    if warning:
        lines += [f"**{warning[0].upper()}{warning[1:]}**", ""]
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
