"""How busy a comparison keeps the cluster: trials in flight over time and mean busy slots, for the current design
(every (strategy, seed) arm in one Tune experiment, `flexora_tune.compare.compare`) and the previous one (one Tune
experiment per arm, run one after another), side by side in one run.

One local Ray with `--slots` logical CPU slots (`ray.init(num_cpus=slots)`, 1 CPU per trial, 1 torch thread), the
tests' tiny Llama (4 blocks) on a keyword CSV, flexora, random, all and last-k with `--seeds` seeds and `--trials`
fine-tunes per seed, trials made long enough to overlap (`--steps` fine-tune steps, a third of them for the
search, which then takes about as long as a fine-tune, as a search sized by the reference's share does). The
previous design is reproduced with the same arms (`search.comparison_arms`): each arm's own searcher in its own
`Tuner`, seed by seed, Flexora's arm first, the other arms sized by that seed's Flexora selection (k).

A trial is busy from its trainable's start (``start_time``) to its last report (``report_time``). *Mean busy
slots*: the sum of the trials' busy times over the span from the first trial's start to the last trial's end.
*In flight*: trials busy at a moment (a sweep over the start/end events; sampled every second for the profile).

    .venv/bin/python benchmarks/compare_utilization.py                # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    RESULTS,
    LoadSampler,
    command_line,
    fmt,
    header_markdown,
    machine_info,
    markdown_table,
    write_json,
)

STRATEGIES = ("flexora", "random", "all", "last-k")
METRIC, MODE = "val_accuracy", "max"


def utilization(spans: list[tuple[float, float]], slots: int) -> dict[str, Any]:
    """Peak and mean trials in flight between the first start and the last end, and a per-second profile."""
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    busy = sum(e - s for s, e in spans)
    profile = [sum(1 for s, e in spans if s <= t < e) for t in [first + i + 0.5 for i in range(int(last - first))]]
    return {"trials": len(spans), "span_s": last - first, "busy_s": busy, "peak_in_flight": peak,
            "mean_busy_slots": busy / (last - first), "utilization": busy / (last - first) / slots,
            "in_flight_per_s": profile}


def spans_of(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(float(r["start_time"]), float(r["end_time"])) for r in rows]


def run_new(args: argparse.Namespace, model: str, task: dict, settings: dict, scratch: Path) -> dict[str, Any]:
    """The current design: `compare` (one experiment, every arm in flight)."""
    from flexora_tune.compare import compare

    started = time.time()
    df = compare(out=scratch / "new", model=model, task=task, strategies=STRATEGIES, seeds=args.seeds,
                 trials=args.trials, cpus_per_trial=1, settings=settings)
    wall = time.time() - started
    rows = df.to_dict("records")
    return {"design": "one experiment (new)", "wall_s": wall, **utilization(spans_of(rows), args.slots)}


def run_old(args: argparse.Namespace, model: str, task: dict, settings: dict, scratch: Path) -> dict[str, Any]:
    """The previous design: one Tuner per (strategy, seed) arm, one after another; k from that seed's search."""
    from ray import tune

    from flexora_tune import trainable
    from flexora_tune.blocks import parse_blocks
    from flexora_tune.search import comparison_arms

    base = {"model": model, "task": task, **settings}
    resources = tune.with_resources(trainable, {"cpu": 1})
    spans: list[tuple[float, float]] = []
    started = time.time()
    for seed in range(args.seeds):
        k = None
        for strategy in STRATEGIES:  # flexora first, as the old loop ordered them
            arm = next(iter(comparison_arms([strategy], [seed], args.trials, metric=METRIC, mode=MODE,
                                            num_blocks=4, k=k if strategy != "flexora" else None).values()))
            grid = tune.Tuner(
                resources, param_space=dict(base),
                tune_config=tune.TuneConfig(search_alg=arm, metric=METRIC, mode=MODE,
                                            num_samples=arm.planned_trials, reuse_actors=True),
                run_config=tune.RunConfig(name=f"{strategy}_seed{seed}", storage_path=str(scratch / "old"),
                                          verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            ).fit()
            for result in grid:
                m = result.metrics or {}
                spans.append((float(m["start_time"]), float(m["report_time"])))
                if strategy == "flexora" and m.get("stage") == "search":
                    k = len(parse_blocks(m["blocks"]))
            print(f"[old] {strategy}_seed{seed}: {len(grid)} trials (k={k})", flush=True)
    wall = time.time() - started
    return {"design": "one experiment per arm (previous)", "wall_s": wall, **utilization(spans, args.slots)}


def write_markdown(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any],
                   command: str, load: dict[str, float]) -> None:
    text = header_markdown("Comparison utilization: one experiment for every arm vs one experiment per arm", info,
                           command, load)
    text += (
        f"\n{len(STRATEGIES)} strategies ({', '.join(STRATEGIES)}) x {args.seeds} seeds, `--trials {args.trials}` "
        f"(per seed: Flexora's search + {args.trials} fine-tunes, random {args.trials}, all 1, last-k 1), the tests' "
        f"tiny Llama (4 blocks) on a {args.rows}-row keyword CSV (max_length 32), {args.steps} fine-tune steps "
        f"(evaluation every {args.steps // 2}) and {args.steps // 3} search steps per trial. One local Ray with "
        f"`ray.init(num_cpus={args.slots})` and 1 CPU per trial: {args.slots} logical slots on a machine with "
        f"{os.cpu_count()} cores, "
        "so concurrent trials share cores (each runs one torch thread) and a trial's busy time grows with the "
        "trials beside it; the slots, not the cores, are what the designs fill. Both designs ran in this one "
        "process, one after the other (new first).\n\n"
        "*busy*: a trial's trainable start to its last report; *mean busy slots*: the trials' busy seconds over "
        "the span from the first start to the last end; *utilization*: that over the slots.\n\n"
    )
    header = ["design", "trials", "wall s", "span s", "peak in flight", "mean busy slots", "utilization"]
    text += markdown_table(header, [[r["design"], r["trials"], fmt(r["wall_s"], 1), fmt(r["span_s"], 1),
                                     r["peak_in_flight"], fmt(r["mean_busy_slots"], 2), fmt(r["utilization"], 2)]
                                    for r in rows]) + "\n\n"
    for r in rows:
        text += f"- {r['design']}: trials in flight per second: {' '.join(map(str, r['in_flight_per_s']))}\n"
    new = rows[0]
    ok = new["peak_in_flight"] >= args.slots and new["mean_busy_slots"] >= 0.9 * args.slots
    text += (f"\nAcceptance (new design reaches {args.slots} in flight and mean busy slots >= "
             f"{0.9 * args.slots:.1f}): {'met' if ok else 'NOT met'}.\n")
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=4, help="ray.init(num_cpus=...) (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--trials", type=int, default=4, help="fine-tunes per strategy and seed (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=600,
                        help="fine-tune steps; the search runs a third of them (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=600, help="rows of the keyword CSV (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, info, load = command_line(), machine_info(), LoadSampler()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "tests"))
    import ray
    import tiny

    with tempfile.TemporaryDirectory(prefix="compare_util_") as tmp:
        scratch = Path(tmp)
        model = str(tiny.save_model_dir(scratch / "tiny_llama", "llama"))
        csv = tiny.write_csv(scratch / "keywords.csv", tiny.classification_rows(args.rows))
        task = {"source": str(csv), "max_length": 32}
        settings = {"max_steps": args.steps, "epochs": 1000, "eval_every": args.steps // 2, "lr": 1e-2, "batch_size": 8,
                    "search": {"steps": args.steps // 3, "stop_when_stable": None}}
        ray.init(num_cpus=args.slots, include_dashboard=False, log_to_driver=False)
        try:
            load.sample()
            rows = [run_new(args, model, task, settings, scratch)]
            load.sample()
            rows.append(run_old(args, model, task, settings, scratch))
            load.sample()
        finally:
            ray.shutdown()
    for r in rows:
        print(f"{r['design']}: {r['trials']} trials, wall {r['wall_s']:.1f}s, span {r['span_s']:.1f}s, peak in "
              f"flight {r['peak_in_flight']}, mean busy slots {r['mean_busy_slots']:.2f}", flush=True)
    info["load_avg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "compare_utilization.json", {"command": command, "machine": info, "load": load.summary(),
                                                       "args": {k: str(v) for k, v in vars(args).items()},
                                                       "designs": rows})
    write_markdown(args.out / "compare_utilization.md", rows, args, info, command, load.summary())
    print(f"wrote {args.out / 'compare_utilization.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
