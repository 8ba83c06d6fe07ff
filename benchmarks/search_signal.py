"""Does Flexora's search find signal? Its default against cheap ways to get more signal per FLOP, several seeds.

Every variant runs as one `flexora_tune.compare.compare` of `flexora` and `random` (k = that seed's Flexora
size) with one fine-tune per seed; the all-blocks fine-tunes (the compute unit and the second reference) come
from a `--baseline` comparison with the same task, settings and seeds (or from this script's `default` run,
which then adds `all`). Variants:

- ``default``: the default search (12 steps in the small-data regime, 1 search-validation batch per gate step,
  alpha_lr 0.01, stop-when-stable 4);
- ``val-batches-4``: 4 search-validation batches per gate step (a less noisy hypergradient);
- ``alpha-lr-5x``: alpha_lr 0.05;
- ``long-36``: up to 36 steps, still ended by stop-when-stable;
- ``consensus-3``: three default searches per seed (seeds s, s + 1000, s + 2000), their majority vote.

Per variant: the agreement across seeds of the subset each seed fine-tunes (mean pairwise Jaccard against
random subsets of the same sizes, permutation p-value, `flexora_tune.stability.agreement_test`), alpha's
separation, the paired test- and validation-accuracy difference of that fine-tune against random-k and
against all blocks (mean, 95% t interval over seeds, verdict) and the pipeline's compute (searches plus the
fine-tune) in fine-tune equivalents (FLOPs over the seed's all-blocks fine-tune).

    .venv/bin/python benchmarks/search_signal.py --seeds 5 --cpus-per-trial 1 --max-length 48 --val-size 150 \\
        --test-size 300 --set max_train_examples=96 --set epochs=5 --set lr=5e-3 --set eval_every=1000000 \\
        --baseline results/qpc5
    .venv/bin/python benchmarks/search_signal.py --model tiny --seeds 3 --variants default,alpha-lr-5x \\
        --max-length 32 --set max_steps=6 --set lr=0.01 --set search.steps=4   # a smoke test, minutes
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
    RESULTS,
    LoadSampler,
    command_line,
    fmt,
    header_markdown,
    machine_info,
    markdown_table,
    write_csv,
    write_json,
)
from quality_per_compute import _tiny, build_settings, parse_setting  # noqa: E402

#: name -> (search settings over the defaults, searches per seed)
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "default": ({}, 1),
    "val-batches-4": ({"val_batches": 4}, 1),
    "alpha-lr-5x": ({"alpha_lr": 0.05}, 1),
    "long-36": ({"steps": 36}, 1),
    "consensus-3": ({}, 3),
}
#: A variant qualifies as a default when its selections agree beyond chance and its pipeline stays this cheap.
MAX_PIPELINE_FT = 1.5
SIGNIFICANCE = 0.05
METRIC, MODE = "val_accuracy", "max"


def _finished(out: Path) -> bool:
    done = out / "finished_experiments.json"
    return done.exists() and "comparison" in json.loads(done.read_text())


def _check_baseline(baseline: Path, model: str, task: Any, settings: dict[str, Any], seeds: int) -> None:
    """Refuse a baseline that ran another model, task, settings or seeds: its all-blocks fine-tunes would not
    pair with this run's."""
    meta = json.loads((baseline / "meta.json").read_text())
    wanted = {"task": task, "settings": settings}
    got = {"task": meta.get("task"), "settings": meta.get("settings")}
    if json.loads(json.dumps(wanted, default=str)) != got or meta.get("seeds", 0) < seeds:
        raise SystemExit(f"--baseline {baseline} ran {got} with {meta.get('seeds')} seeds, not {wanted} with {seeds}")
    if not {"flexora", "random", "all"} <= set(meta.get("strategies", [])):
        raise SystemExit(f"--baseline {baseline} must have run flexora, random and all")
    if Path(str(meta.get("model"))).name != Path(model).name and meta.get("model") != model:
        raise SystemExit(f"--baseline {baseline} ran model {meta.get('model')}, not {model}")


def run_variant(name: str, out: Path, model: str, task: Any, settings: dict[str, Any], seeds: int,
                cpus_per_trial: float, with_all: bool, storage: str | None) -> Any:
    """The variant's comparison (flexora and random, plus all when `with_all`), or its finished results."""
    from flexora_tune.compare import compare
    from flexora_tune.report import read_trials

    if _finished(out):
        print(f"[search_signal] {name}: finished earlier, reading {out}", flush=True)
        return read_trials(out)
    overrides, searches = VARIANTS[name]
    merged = json.loads(json.dumps(settings))
    merged.setdefault("search", {}).update(overrides)
    if not merged["search"]:
        del merged["search"]
    strategies = ("flexora", "random", "all") if with_all else ("flexora", "random")
    print(f"[search_signal] {name}: {strategies}, {seeds} seeds, {searches} search(es) per seed, "
          f"search settings {merged.get('search', {})}", flush=True)
    return compare(out=out, model=model, task=task, strategies=strategies, seeds=seeds, trials=1,
                   searches=searches, settings=merged, cpus_per_trial=cpus_per_trial, reference="random",
                   storage_path=storage)


def _paired(diffs: list[float]) -> dict[str, Any]:
    from flexora_tune.report import mean_confidence_interval
    from flexora_tune.report.paired import verdict

    mean, lo, hi, n = mean_confidence_interval(diffs)
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "verdict": verdict(lo, hi, n, MODE)}


def analyse(name: str, trials: Any, all_rows: Any, seeds: int) -> dict[str, Any]:
    """One variant's stability, separation, compute and paired differences (see the module docstring)."""
    import pandas as pd

    from flexora_tune.blocks import parse_blocks
    from flexora_tune.report import finetune_equivalents
    from flexora_tune.stability import agreement_test

    frame = pd.concat([trials[trials["strategy"] != "all"], all_rows], ignore_index=True)
    frame = frame[pd.to_numeric(frame["seed"], errors="coerce") < seeds]
    frame = frame.assign(ft=finetune_equivalents(frame))
    finetunes = frame[(frame["stage"] == "finetune") & (frame["status"] != "ERROR")]
    first = finetunes.sort_values("start_time", kind="stable").groupby(["strategy", "seed"]).head(1)
    chosen = {(r.strategy, int(r.seed)): r for r in first.itertuples(index=False)}
    flexora = sorted(s for (strategy, s) in chosen if strategy == "flexora")
    subsets = [parse_blocks(chosen[("flexora", s)].blocks) for s in flexora]
    total = int(pd.to_numeric(frame["num_blocks_total"], errors="coerce").dropna().iloc[0])
    test = agreement_test(subsets, total) if len(subsets) >= 2 else None
    searches = frame[(frame["strategy"] == "flexora") & (frame["stage"] == "search")]
    separation = pd.to_numeric(searches.get("alpha_separation"), errors="coerce")
    pipeline = frame[frame["strategy"] == "flexora"].groupby("seed")["ft"].sum()
    search_ft = searches.groupby("seed")["ft"].sum()
    row: dict[str, Any] = {
        "variant": name, "seeds": len(flexora), "searches": len(searches),
        "k_mean": sum(map(len, subsets)) / len(subsets) if subsets else math.nan,
        "jaccard": test.observed if test else math.nan, "jaccard_random": test.expected if test else math.nan,
        "p_value": test.p_value if test else math.nan,
        "separation_mean": float(separation.mean()) if separation.notna().any() else math.nan,
        "search_ft_mean": float(search_ft.mean()) if len(search_ft) else math.nan,
        "pipeline_ft_mean": float(pipeline.mean()) if len(pipeline) else math.nan,
        "pipeline_ft_max": float(pipeline.max()) if len(pipeline) else math.nan,
        "flexora_test_mean": float(pd.Series([chosen[("flexora", s)].test_accuracy for s in flexora]).mean()),
    }
    for reference in ("random", "all"):
        for metric, column in (("test", "test_accuracy"), ("val", "val_accuracy")):
            diffs = [float(getattr(chosen[("flexora", s)], column)) - float(getattr(chosen[(reference, s)], column))
                     for s in flexora if (reference, s) in chosen]
            for key, value in _paired(diffs).items():
                row[f"{metric}_vs_{reference}_{key}"] = value
    row["qualifies"] = bool(test and test.p_value < SIGNIFICANCE and row["pipeline_ft_max"] <= MAX_PIPELINE_FT)
    row["selections"] = "; ".join(",".join(map(str, s)) for s in subsets)
    return row


def _diff(row: dict[str, Any], metric: str, reference: str) -> str:
    p = f"{metric}_vs_{reference}_"
    if not row[p + "n"]:
        return "-"
    return (f"{row[p + 'mean']:+.3f} [{fmt(row[p + 'lo'], 3)}, {fmt(row[p + 'hi'], 3)}] {row[p + 'verdict']}")


def write_markdown(path: Path, rows: list[dict[str, Any]], info: dict[str, Any], command: str,
                   load: dict[str, float], args: argparse.Namespace, out: Path) -> None:
    table = [[r["variant"], r["seeds"], fmt(r["k_mean"], 3),
              f"{fmt(r['jaccard'], 3)} vs {fmt(r['jaccard_random'], 3)}", fmt(r["p_value"], 3),
              fmt(r["separation_mean"], 3), fmt(r["search_ft_mean"], 3),
              f"{fmt(r['pipeline_ft_mean'], 3)} (max {fmt(r['pipeline_ft_max'], 3)})", fmt(r["flexora_test_mean"], 3),
              _diff(r, "test", "random"), _diff(r, "test", "all"), _diff(r, "val", "random"), _diff(r, "val", "all"),
              "yes" if r["qualifies"] else "no"] for r in rows]
    text = header_markdown("Search signal: does the default search find blocks that agree across seeds?", info,
                           command, load)
    text += (
        f"- Model `{args.model}`, task `{args.task}`; {args.seeds} seeds; settings "
        f"`{json.dumps(build_settings(args.set or []))}`; comparisons under `{out}`\n\n"
        "Per variant, over seeds: *k* the mean size of the subset Flexora fine-tunes (for consensus-3 the majority "
        "vote of three searches); *Jaccard*: their mean pairwise Jaccard against the expectation for random "
        "subsets of the same sizes, and the permutation p-value (10,000 draws); *separation*: alpha's spread over "
        "what pure noise reaches in as many Adam steps (about 1: noise, 3: separated); *search ft* and *pipeline "
        "ft*: compute of the searches, and of searches plus the fine-tune, in all-blocks fine-tunes of the same "
        "seed (FLOPs); *Δ*: the paired difference Flexora minus random-k (same seed, same k) or minus all blocks, "
        "mean and 95% t interval over seeds, and the verdict at 95%. *qualifies*: p < "
        f"{SIGNIFICANCE} and a pipeline of at most {MAX_PIPELINE_FT} fine-tune equivalents on every seed.\n\n"
    )
    text += markdown_table(["variant", "seeds", "k", "Jaccard vs random", "p", "separation", "search ft",
                            "pipeline ft", "test acc", "Δ test vs random-k", "Δ test vs all", "Δ val vs random-k",
                            "Δ val vs all", "qualifies"], table)
    text += "\n\nSelections per seed (blocks, seed 0 first):\n\n"
    text += "\n".join(f"- {r['variant']}: {r['selections']}" for r in rows) + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name/path, or 'tiny' for a smoke test")
    parser.add_argument("--task", default="default", help="task name or file (default: BBC News; also bbc-lm)")
    parser.add_argument("--max-length", type=int, default=None, help="token cut-off per example")
    parser.add_argument("--val-size", type=int, default=None, help="validation examples")
    parser.add_argument("--test-size", type=int, default=None, help="test examples")
    parser.add_argument("--seeds", type=int, default=5, help="seeds (default 5)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", type=parse_setting, metavar="KEY=VALUE",
                        help="a trial setting (JSON value), repeatable; search.steps=4 nests")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs (torch threads) per trial")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a finished compare folder with flexora, random and all on the same task, settings and "
                             "seeds: its rows are the default variant and the all-blocks reference")
    parser.add_argument("--out", type=Path, default=None, help="folder of the comparisons (default results/<name>)")
    parser.add_argument("--name", default=None, help="result stem (default search_signal_<task>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    name = args.name or ("search_signal_tiny_smoke" if args.model == "tiny" else f"search_signal_{args.task}")
    out = (args.out or Path("results") / name).resolve()
    command, info, load = command_line(), machine_info(), LoadSampler()
    load.start()
    os.environ["FLEXORA_TUNE_COMMAND"] = command
    from flexora_tune.report import read_trials

    settings = build_settings(args.set or [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="flexora_signal_") as tmp:
        model, task = _tiny(Path(tmp)) if args.model == "tiny" else (args.model, args.task)
        overrides = {"max_length": args.max_length, "val_size": args.val_size, "test_size": args.test_size}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        task = {"source": task, **overrides} if overrides else task
        storage = str(Path(tmp) / "ray") if args.model == "tiny" else None
        if args.baseline is not None:
            _check_baseline(args.baseline.resolve(), model, task, settings, args.seeds)
            base = read_trials(args.baseline)
        else:
            first = "default" if "default" in variants else variants[0]
            base = run_variant(first, out / first, model, task, settings, args.seeds, args.cpus_per_trial, True,
                               storage)
        all_rows = base[base["strategy"] == "all"]
        for variant in variants:
            if variant == "default" and args.baseline is not None:
                trials = base[base["strategy"].isin(["flexora", "random"])]
            else:
                trials = run_variant(variant, out / variant, model, task, settings, args.seeds, args.cpus_per_trial,
                                     False, storage)
            rows.append(analyse(variant, trials, all_rows, args.seeds))
            print(f"[search_signal] {variant}: Jaccard {fmt(rows[-1]['jaccard'], 3)} vs "
                  f"{fmt(rows[-1]['jaccard_random'], 3)} p {fmt(rows[-1]['p_value'], 3)}; pipeline "
                  f"{fmt(rows[-1]['pipeline_ft_mean'], 3)} ft; Δtest vs random {_diff(rows[-1], 'test', 'random')}",
                  flush=True)
    load.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_csv(RESULTS / f"{name}.csv", rows)
    write_json(RESULTS / f"{name}.json", {"command": command, "machine": info, "load": load.summary(), "rows": rows})
    write_markdown(RESULTS / f"{name}.md", rows, info, command, load.summary(), args, out)
    print(f"[search_signal] wrote {RESULTS / name}.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
