"""Do the Flexora searches of a comparison's seeds agree beyond chance? Read from the trials table alone.

Each seed's search is one row of ``trials.csv`` (stage ``search``) with its selection (``blocks``) and final
``alpha``. Across seeds, `stability.search_agreement` compares the selections, and the top-k blocks by alpha,
with random subsets of the same sizes. The result goes to ``search_agreement.json``, one line under the table
of ``summary.md``, and one printed line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..blocks import parse_blocks
from ..results import ALPHA_SEPARATION, SEARCH_AGREEMENT_FILE
from ..stability import DRAWS, SEED, SEPARATED, SearchAgreement, search_agreement
from .trials import ERROR_STATUS

SEARCH_STAGE = "search"
#: Statuses of search trials whose selection is not a finished search's (errored, or cut short by a scheduler).
UNFINISHED: tuple[str, ...] = (ERROR_STATUS, "EARLY_STOPPED")


def block_values(value: Any, num_blocks: int) -> list[float] | None:
    """A per-block cell of the trials table (a search's ``alpha``, a probe's ``probe_scores``: a JSON list as
    written to trials.csv, or a list, tuple or array) as floats, or None when missing, unreadable, of the wrong
    length or not finite."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    try:
        if isinstance(value, str) and value.strip().startswith("["):
            values = [float(v) for v in json.loads(value)]
        elif isinstance(value, list | tuple):
            values = [float(v) for v in value]
        else:
            return None
    except (json.JSONDecodeError, TypeError, ValueError):
        return None
    return values if len(values) == num_blocks and all(math.isfinite(v) for v in values) else None


def finished_searches(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (strategy, seed): its last-started finished search trial with a readable selection, with
    ``_blocks`` (the parsed selection) added. Empty without search trials."""
    if "stage" not in trials.columns:
        return trials.iloc[0:0]
    df = trials.reset_index(drop=True)
    df = df.assign(_order=range(len(df)), _blocks=df["blocks"].map(parse_blocks),
                   _start=pd.to_numeric(df["start_time"], errors="coerce"),
                   _total=pd.to_numeric(df["num_blocks_total"], errors="coerce"))
    status = df["status"].fillna("").astype(str).str.strip().str.upper()
    stage = df["stage"].astype(str).str.strip().str.lower()
    ok = (stage == SEARCH_STAGE) & ~status.isin(UNFINISHED) & df["_blocks"].notna() & df["_total"].notna()
    found = df[ok].sort_values(["_start", "_order"], na_position="first", kind="stable")
    return found.groupby(["strategy", "seed"], sort=True).tail(1).sort_values(["strategy", "seed"], kind="stable")


def _separations(rows: pd.DataFrame) -> tuple[float, ...]:
    if ALPHA_SEPARATION not in rows.columns:
        return ()
    values = pd.to_numeric(rows[ALPHA_SEPARATION], errors="coerce")
    return tuple(float(v) for v in values) if values.notna().all() else ()


def search_agreements(trials: pd.DataFrame, k: int | None = None, draws: int = DRAWS,
                      seed: int = SEED) -> dict[str, SearchAgreement]:
    """Per strategy with finished searches on at least two seeds (`finished_searches`), their
    `SearchAgreement`: of the selections and, when every one of those rows has a full ``alpha``, of the top-`k`
    blocks by alpha (default: the median selection size); the searches' ``alpha_separation`` when the table
    has that column. Searches of different block counts are not compared (the strategy is left out)."""
    found = finished_searches(trials)
    out: dict[str, SearchAgreement] = {}
    for strategy, rows in found.groupby("strategy", sort=True):
        totals = rows["_total"].astype(int).unique()
        if len(rows) < 2 or len(totals) != 1:
            continue
        total = int(totals[0])
        alphas = [block_values(v, total) for v in rows["alpha"]] if "alpha" in rows.columns else []
        full = alphas if alphas and all(a is not None for a in alphas) else None
        out[str(strategy)] = search_agreement(list(rows["_blocks"]), total, full, k, _separations(rows), draws, seed)
    return out


def agreement_lines(agreements: dict[str, SearchAgreement]) -> list[str]:
    """One line per strategy (`SearchAgreement.line`), for the terminal and ``summary.md``."""
    return [agreement.line(strategy) for strategy, agreement in agreements.items()]


def agreement_note(agreements: dict[str, SearchAgreement]) -> str | None:
    """The paragraph of ``summary.md`` on search agreement: the lines and what they compare; None without
    agreements."""
    if not agreements:
        return None
    lines = " ".join(f"**{line}.**" for line in agreement_lines(agreements))
    text = (f"Search agreement across seeds: {lines} Jaccard: the mean over pairs of seeds of shared blocks over "
            "blocks in either selection, against its exact expectation for random subsets of the same sizes; p: "
            f"the share of {DRAWS:,} seeded random draws that agree at least as much; top-k: the same for each "
            "search's k highest-alpha blocks, one k for all.")
    if any(a.separations for a in agreements.values()):
        text += (f" Separation: alpha's spread over what noise alone gives in as many steps (about 1 for noise, "
                 f"separated from {SEPARATED:g}).")
    return f"{text} Numbers in `{SEARCH_AGREEMENT_FILE}`."


def write_agreement(agreements: dict[str, SearchAgreement], out_dir: str | Path,
                    trials: pd.DataFrame | None = None) -> Path | None:
    """Write ``search_agreement.json`` (strategy -> `SearchAgreement.to_dict` plus its seeds, trial ids and
    line) and return its path; without agreements, remove a stale one and return None."""
    path = Path(out_dir) / SEARCH_AGREEMENT_FILE
    if not agreements:
        path.unlink(missing_ok=True)
        return None
    found = finished_searches(trials) if trials is not None else None
    data = {}
    for strategy, agreement in agreements.items():
        entry = agreement.to_dict()
        if found is not None:
            rows = found[found["strategy"].astype(str) == strategy]
            entry.update(seeds=[_plain(s) for s in rows["seed"]], trial_ids=[str(t) for t in rows["trial_id"]])
        data[strategy] = {**entry, "line": agreement.line(strategy)}
    path.write_text(json.dumps(data, indent=2))
    return path


def _plain(value: Any) -> Any:
    """A seed cell as a JSON-friendly int where it is one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return int(number) if number.is_integer() else number
