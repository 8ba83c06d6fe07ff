"""Quality per compute: Flexora against random subsets, TPE, all blocks, first-k and last-k, under the same
compute budget and several seeds, through `flexora_tune.compare.compare` (Ray Tune).

Per strategy (over seeds, mean and min-max spread):
  - the best validation metric, and the test metric of that same trial;
  - the compute seconds (search trials included, in start order) until the strategy first reached the
    all-blocks LoRA's validation metric of the same seed, or "never";
  - the ratio of each strategy's compute to Flexora's for the same quality: at the all-blocks level, and at
    Flexora's own best level (per seed, over the seeds where both reached it).
It writes compare's folder (trials.csv, summary.csv, best_so_far.png, ...) to `--out`, and its own table as
`<name>.csv` and `<name>.md` both there and in benchmarks/results/.

With the reference settings the run on the embedded default takes hours on a CPU (three seeds of six
strategies, three epochs over 1,525 articles each); the committed run uses the small-data regime (46 min on 2
cores); `--model tiny` runs the same pipeline on the tests' 4-block Llama in a few minutes (a smoke test).

    .venv/bin/python benchmarks/quality_per_compute.py --seeds 3 --trials 2 --budget-s 150 --cpus-per-trial 2 \\
        --max-length 48 --val-size 150 --test-size 300 --set max_train_examples=96 --set epochs=5 \\
        --set lr=5e-3 --set eval_every=1000000
    .venv/bin/python benchmarks/quality_per_compute.py --model tiny --trials 2 --max-length 32 \\
        --set max_steps=6 --set lr=0.01 --set search.steps=4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
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
    median,
    spread,
    write_csv,
)

ALL_STRATEGIES = ("flexora", "random", "tpe", "all", "first-k", "last-k")
REFERENCE = "all"


def parse_setting(text: str) -> tuple[list[str], Any]:
    """``key=value`` (value as JSON when it parses, else a string); ``search.steps=4`` nests."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"settings are key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def build_settings(pairs: list[tuple[list[str], Any]]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for path, value in pairs:
        node = settings
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return settings


def _ordered(df: Any) -> Any:
    return df.sort_values(["start_time"], kind="stable", na_position="last")


def compute_to_reach(group: Any, level: float, metric: str, mode: str) -> float:
    """Cumulative compute seconds (trials in start order, searches included) up to and including the first
    fine-tune trial whose `metric` reaches `level`; NaN when none does."""
    import numpy as np

    if not math.isfinite(level):
        return math.nan
    ordered = _ordered(group)
    spent = ordered["compute_s"].fillna(0.0).astype(float).cumsum()
    values = ordered[metric].astype(float)
    ok = (ordered["stage"] == "finetune") & (ordered["status"] != "ERROR") & np.isfinite(values)
    reached = ok & ((values >= level - 1e-12) if mode == "max" else (values <= level + 1e-12))
    if not reached.any():
        return math.nan
    return float(spent[reached].iloc[0])


def analyse(trials: Any, metric: str = "val_accuracy", mode: str = "max") -> tuple[list[dict[str, Any]],
                                                                                      list[dict[str, Any]]]:
    """Per (strategy, seed) and per strategy: quality, compute to the all-blocks level, ratios to Flexora."""
    from flexora_tune.report import best_per_seed

    per_seed = best_per_seed(trials, metric, mode)
    best = {(r.strategy, r.seed): r for r in per_seed.itertuples(index=False)}
    seeds = sorted({int(s) for s in trials["seed"]})
    strategies = [s for s in ALL_STRATEGIES if s in set(trials["strategy"])]
    strategies += sorted(set(trials["strategy"]) - set(strategies))
    seed_rows = []
    for strategy in strategies:
        for seed in seeds:
            group = trials[(trials["strategy"] == strategy) & (trials["seed"] == seed)]
            if group.empty:
                continue
            row = best.get((strategy, seed))
            ref = best.get((REFERENCE, seed))
            flex = best.get(("flexora", seed))
            ref_level = float(ref.best_val) if ref is not None else math.nan
            flex_level = float(flex.best_val) if flex is not None else math.nan
            seed_rows.append({
                "strategy": strategy, "seed": seed,
                "best_val": float(row.best_val) if row is not None else math.nan,
                "test_of_best": float(row.test_of_best) if row is not None else math.nan,
                "total_compute_s": float(group["compute_s"].fillna(0).sum()),
                "all_blocks_val": ref_level,
                "compute_to_all_level_s": compute_to_reach(group, ref_level, metric, mode),
                "flexora_best_val": flex_level,
                "compute_to_flexora_level_s": compute_to_reach(group, flex_level, metric, mode),
                "blocks_of_best": row.blocks if row is not None else "",
            })
    by_seed = {(r["strategy"], r["seed"]): r for r in seed_rows}
    summary = []
    for strategy in strategies:
        rows = [r for r in seed_rows if r["strategy"] == strategy]
        out: dict[str, Any] = {"strategy": strategy, "seeds": len(rows)}
        for key in ("best_val", "test_of_best", "total_compute_s"):
            values = [r[key] for r in rows if math.isfinite(r[key])]
            lo, hi = spread(values)
            out[f"{key}_mean"] = sum(values) / len(values) if values else math.nan
            out[f"{key}_min"], out[f"{key}_max"] = lo, hi
        for level in ("all_level", "flexora_level"):
            reached = [r[f"compute_to_{level}_s"] for r in rows if math.isfinite(r[f"compute_to_{level}_s"])]
            out[f"{level}_reached_seeds"] = len(reached)
            out[f"compute_to_{level}_median_s"] = median(reached)
            ratios = []
            for r in rows:
                flex = by_seed.get(("flexora", r["seed"]))
                mine, theirs = r[f"compute_to_{level}_s"], flex[f"compute_to_{level}_s"] if flex else math.nan
                if math.isfinite(mine) and math.isfinite(theirs) and theirs > 0:
                    ratios.append(mine / theirs)
            out[f"ratio_to_flexora_{level}_median"] = median(ratios)
            out[f"ratio_to_flexora_{level}_seeds"] = len(ratios)
        summary.append(out)
    return seed_rows, summary


def _reach(row: dict[str, Any], level: str) -> str:
    n, seeds = row[f"{level}_reached_seeds"], row["seeds"]
    if n == 0:
        return "never"
    return f"{row[f'compute_to_{level}_median_s']:.3g} ({n}/{seeds} seeds)"


def _ratio(row: dict[str, Any], level: str) -> str:
    n = row[f"ratio_to_flexora_{level}_seeds"]
    return "-" if n == 0 else f"{fmt(row[f'ratio_to_flexora_{level}_median'], 2)} ({n} seeds)"


def write_markdown(path: Path, summary: list[dict[str, Any]], info: dict[str, Any], command: str,
                   load: dict[str, float], args: argparse.Namespace, out: Path) -> None:
    rows = [[
        r["strategy"],
        f"{fmt(r['best_val_mean'], 3)} [{fmt(r['best_val_min'], 3)}, {fmt(r['best_val_max'], 3)}]",
        f"{fmt(r['test_of_best_mean'], 3)} [{fmt(r['test_of_best_min'], 3)}, {fmt(r['test_of_best_max'], 3)}]",
        _reach(r, "all_level"), _ratio(r, "all_level"), _reach(r, "flexora_level"), _ratio(r, "flexora_level"),
        f"{r['total_compute_s_mean']:.3g}",
    ] for r in summary]
    shown = os.path.relpath(out, REPO) if out.is_relative_to(REPO) else str(out)
    text = header_markdown("Quality per compute: Flexora against the baselines", info, command, load)
    text += (
        f"- Model `{args.model}`, task `{args.task}`; strategies {args.strategies}; {args.seeds} seeds; up to "
        f"{args.trials} trials and {args.budget_s or 'no'} compute seconds per strategy and seed; settings "
        f"`{json.dumps(build_settings(args.set or []))}`\n- compare's folder: `{shown}` (trials.csv, summary.csv, "
        "best_so_far.png)\n\n"
        "Mean [min, max] over seeds of each seed's best fine-tune by validation accuracy, and the test accuracy "
        "of that same trial. *to all-blocks level*: median compute seconds (searches included, trials in start "
        "order) until a fine-tune first reached the all-blocks LoRA's validation accuracy of the same seed; "
        "*ratio*: that compute over Flexora's, median over seeds where both reached it (> 1: the strategy "
        "needed more compute than Flexora). The same at Flexora's own best level.\n\n"
    )
    text += markdown_table(["strategy", "best val", "test of best", "to all-blocks level (s)", "ratio to Flexora",
                            "to Flexora's level (s)", "ratio to Flexora", "total compute (s)"], rows)
    text += "\n\n![best so far](best_so_far.png)\n" if (out / "best_so_far.png").exists() and path.parent == out \
        else f"\n\nBest-so-far plot: `{shown}/best_so_far.png`\n"
    path.write_text(text)


def _tiny(directory: Path) -> tuple[str, str]:
    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    model = tiny.save_model_dir(directory / "tiny_llama", "llama")
    task = tiny.write_csv(directory / "keywords.csv", tiny.classification_rows(200))
    return str(model), str(task)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name/path, or 'tiny' for a smoke test (default)")
    parser.add_argument("--task", default="default", help="task name or file (default: BBC News)")
    parser.add_argument("--max-length", type=int, default=None, help="token cut-off per example (task setting)")
    parser.add_argument("--val-size", type=int, default=None, help="validation examples (task setting)")
    parser.add_argument("--test-size", type=int, default=None, help="test examples (task setting)")
    parser.add_argument("--strategies", default=",".join(ALL_STRATEGIES), help="comma-separated (default: all six)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per strategy (default 3)")
    parser.add_argument("--trials", type=int, default=4, help="fine-tunes per strategy and seed (default 4)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="compute seconds per strategy and seed, searches included (default: none)")
    parser.add_argument("--k", type=int, default=None, help="blocks for first-k/last-k/random (default: Flexora's)")
    parser.add_argument("--set", action="append", type=parse_setting, metavar="KEY=VALUE",
                        help="a trial setting (JSON value), repeatable: max_steps=200, eval_every=50, lr=2e-4, "
                             "search.steps=100 (nested: search only)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once per experiment")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs (torch threads) per trial (default 1)")
    parser.add_argument("--storage-path", default=None,
                        help="Ray Tune storage (default: <out>/ray; a temporary folder for --model tiny)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")
    parser.add_argument("--out", type=Path, default=None,
                        help="compare's folder (default benchmarks/results/<name>)")
    parser.add_argument("--name", default=None,
                        help="result stem (default quality_per_compute, or quality_per_compute_tiny_smoke)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    strategies = tuple(s for s in args.strategies.split(",") if s)
    if "flexora" not in strategies or REFERENCE not in strategies:
        raise SystemExit("the ratios need both 'flexora' and 'all' among the strategies")
    name = args.name or ("quality_per_compute_tiny_smoke" if args.model == "tiny" else "quality_per_compute")
    out = (args.out or RESULTS / name).resolve()
    command, info, load = command_line(), machine_info(), LoadSampler()
    os.environ["FLEXORA_TUNE_COMMAND"] = command
    from flexora_tune.compare import compare

    settings = build_settings(args.set or [])
    with tempfile.TemporaryDirectory(prefix="flexora_qpc_") as tmp:
        model, task = _tiny(Path(tmp)) if args.model == "tiny" else (args.model, args.task)
        if args.model == "tiny":
            args.task = "tiny keyword CSV"
        overrides = {"max_length": args.max_length, "val_size": args.val_size, "test_size": args.test_size}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            task = {"source": task, **overrides}
        load.sample()
        trials = compare(out=out, model=model, task=task, strategies=strategies, seeds=args.seeds,
                         trials=args.trials, budget_s=args.budget_s, k=args.k, settings=settings,
                         storage_path=args.storage_path or (str(Path(tmp) / "ray") if args.model == "tiny" else None),
                         max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial, resume=args.resume)
        load.sample()
    seed_rows, summary = analyse(trials)
    for directory in {out, RESULTS}:
        directory.mkdir(parents=True, exist_ok=True)
        write_csv(directory / f"{name}.csv", summary)
        write_csv(directory / f"{name}_per_seed.csv", seed_rows)
        write_markdown(directory / f"{name}.md", summary, info, command, load.summary(), args, out)
    for r in summary:
        print(f"{r['strategy']:>8}: val {fmt(r['best_val_mean'], 3)} test {fmt(r['test_of_best_mean'], 3)} "
              f"to all-level {_reach(r, 'all_level')} ratio {_ratio(r, 'all_level')}")
    print(f"[quality_per_compute] wrote {RESULTS / name}.md and {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
