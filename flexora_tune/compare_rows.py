"""A comparison's Tune results as rows of `trials.csv` (one per trial, its strategy and seed read from its arm) and
the searches' gate trajectories, and the one progress line per finished trial that `compare` prints.

Imports neither Ray nor torch at module level.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import guards
from .results import (
    ALPHA_SEPARATION,
    ARM,
    FINETUNE_METRICS,
    FLOPS,
    PROBE_RANKING,
    PROBE_SCORES,
    PROBE_STAGE,
    SEARCH_METRICS,
    read_selection,
)

#: Stages whose trials report fine-tune metrics only as placeholders (-inf/+inf): their rows hold None there.
UNMEASURED_STAGES = ("search", PROBE_STAGE)


def arm_of(config: dict[str, Any], metrics: dict[str, Any]) -> tuple[str, str, int]:
    """(arm, strategy, seed) of a trial: from its config's arm (``"random_seed0"``), else (a trial run outside
    a comparison) from what it reported."""
    from .search.multiplex import arm_name, parse_arm

    name = config.get(ARM) or metrics.get(ARM)
    if isinstance(name, str) and name:
        strategy, seed = parse_arm(name)
        return name, strategy, seed
    strategy, seed = str(metrics.get("strategy") or config.get("strategy") or ""), int(config.get("seed", 0))
    return arm_name(strategy, seed), strategy, seed


def trial_rows(grid: Iterable[Any], metric: str, *, finished_only: bool = False,
               order: Sequence[str] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per trial of a comparison's `ResultGrid` (sorted by seed, then strategy in `order`, then start),
    and the search trials' gate trajectories keyed by trial id.

    Search and probe rows hold None under the fine-tune metrics (their reports hold placeholders, never a
    measurement); probe rows also hold ``probe_scores``/``probe_ranking`` as JSON text. `finished_only` keeps
    the trials that ran to their end or failed (what an interrupted run may keep: a trial cut short by the
    interruption is continued by ``--resume``, not reported)."""
    rows, trajectories = [], {}
    for result in grid:
        m = dict(result.metrics or {})
        if finished_only and not result.error and m.get("final") is not True:
            continue
        trial_id = m.get("trial_id") or Path(result.path).name
        config = dict(result.config or {})
        arm, strategy, seed = arm_of(config, m)
        status = "ERROR" if result.error else ("TERMINATED" if m.get("final", True) else "EARLY_STOPPED")
        stage = m.get("stage") or config.get("stage", "finetune")
        measured = stage not in UNMEASURED_STAGES
        row = {
            "trial_id": trial_id, "strategy": strategy, "seed": seed, "arm": arm, "stage": stage,
            "variant": m.get("variant") or config.get("variant", ""), "blocks": m.get("blocks", ""),
            "num_blocks": m.get("num_blocks"), "num_blocks_total": m.get("num_blocks_total"),
            "trainable_params": m.get("trainable_params"), FLOPS: m.get(FLOPS),
            ALPHA_SEPARATION: m.get(ALPHA_SEPARATION),
            **{key: m.get(key) if measured else None for key in dict.fromkeys((*FINETUNE_METRICS, metric))},
            **{key: m.get(key) for key in SEARCH_METRICS},
            "compute_s": m.get("compute_s", 0.0), "node": m.get("node_ip", ""),
            "node_id": m.get("node_id", ""),
            "start_time": m.get("start_time"), "end_time": m.get("report_time"), "status": status,
            "steps": m.get("step"), "alpha": json.dumps(m["alpha"]) if stage == "search" and "alpha" in m else "",
            "error": guards.error_line(result.error),
        }
        if stage == PROBE_STAGE:
            row.update({key: json.dumps(m[key]) if key in m else "" for key in (PROBE_SCORES, PROBE_RANKING)})
        rows.append(row)
        data = read_selection(result.checkpoint) if stage == "search" else None
        if data is not None:
            trajectories[trial_id] = {"strategy": strategy, "seed": seed, "steps": data.get("trajectory_steps", []),
                                      "alpha": data.get("alpha_trajectory", [])}
    rank = {name: i for i, name in enumerate(order)}
    rows.sort(key=lambda r: (r["seed"], rank.get(r["strategy"], len(rank)), r["start_time"] or 0.0))
    return rows, trajectories


def progress_callback(planned: int | None, metric: str) -> Any:
    """A Tune callback printing one line per finished trial (its arm, stage, blocks, metric, compute), so a long
    comparison shows where it is."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "ERROR")

        def _line(self, trial, status: str) -> None:
            self.done += 1
            r = trial.last_result or {}
            value = r.get(metric)
            shown = f"{metric} {value:.3f}" if isinstance(value, float) and math.isfinite(value) else ""
            arm = (trial.config or {}).get(ARM, "")
            print(f"[compare] trial {self.done}/{planned or '?'} {status} {arm} {r.get('stage', '')} "
                  f"blocks [{r.get('blocks', '')}] {shown} compute {r.get('compute_s', 0):.0f}s", flush=True)

    return Progress()
