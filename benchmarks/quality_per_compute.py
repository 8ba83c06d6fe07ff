"""Quality per compute: Flexora against the probes (lora-norm, grad-norm), random subsets, TPE, all blocks,
first-k and last-k, equal arms and several seeds, through `flexora_tune.compare.compare` (Ray Tune).

Per strategy (over seeds, mean and min-max spread):
  - the best validation accuracy, and the test accuracy of that same trial;
  - the compute in fine-tune equivalents (training FLOPs over one all-blocks fine-tune of the same seed,
    searches and probes included), until the strategy first reached the all-blocks LoRA's validation accuracy
    of the same seed ("never" if it did not), and its ratio to Flexora's at that level and at Flexora's own;
  - the paired differences (seed by seed) against all blocks, Flexora and random-k: mean, 95% t interval, verdict;
  - for the probes: the rank correlation of their block scores with the same seed's Flexora alpha.
Wall seconds stay as a column (the machine's load moves them). It writes compare's folder (trials.csv,
summary.csv, plots) to `--out`, and its own tables as `<name>*.csv` and `<name>.md` there and in
benchmarks/results/; `--analyse-only` re-reads a finished folder.

The committed run (small-data regime on the embedded default; about 45 min on 2 cores), and the smoke test on
the tests' 4-block Llama (minutes):

    .venv/bin/python benchmarks/quality_per_compute.py --strategies flexora,lora-norm,grad-norm,random,last-k,all \\
        --seeds 5 --trials 1 --cpus-per-trial 1 --max-length 48 --val-size 150 --test-size 300 \\
        --set max_train_examples=96 --set epochs=5 --set lr=5e-3 --set eval_every=1000000
    .venv/bin/python benchmarks/quality_per_compute.py --model tiny --seeds 3 --trials 2 --max-length 32 \\
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
    write_json,
)

ALL_STRATEGIES = ("flexora", "lora-norm", "grad-norm", "random", "tpe", "all", "first-k", "last-k")
REFERENCE = "all"
#: Every strategy is compared seed by seed with each of these that ran.
PAIRED_REFERENCES = ("all", "flexora", "random")
DEFAULT_STRATEGIES = "flexora,lora-norm,grad-norm,random,last-k,all"
#: What the benchmark itself records in compare's folder: its command, machine, start and load.
RUN_FILE = "benchmark_run.json"


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


def compute_to_reach(group: Any, level: float, metric: str, mode: str, cost: str = "ft") -> float:
    """Cumulative compute in column `cost` (fine-tune equivalents by default; trials in start order, searches
    and probes included) up to and including the first fine-tune whose `metric` reaches `level`; NaN when
    none does."""
    import numpy as np

    if not math.isfinite(level):
        return math.nan
    ordered = _ordered(group)
    spent = pd_numeric(ordered[cost]).fillna(0.0).cumsum()
    values = pd_numeric(ordered[metric])
    ok = (ordered["stage"] == "finetune") & (ordered["status"] != "ERROR") & np.isfinite(values)
    reached = ok & ((values >= level - 1e-12) if mode == "max" else (values <= level + 1e-12))
    if not reached.any():
        return math.nan
    return float(spent[reached].iloc[0])


def pd_numeric(values: Any) -> Any:
    import pandas as pd

    return pd.to_numeric(values, errors="coerce").astype(float)


def _strategies(trials: Any) -> list[str]:
    present = set(trials["strategy"])
    return [s for s in ALL_STRATEGIES if s in present] + sorted(present - set(ALL_STRATEGIES))


def analyse(trials: Any, metric: str = "val_accuracy", mode: str = "max") -> tuple[list[dict[str, Any]],
                                                                                      list[dict[str, Any]]]:
    """Per (strategy, seed) and per strategy: quality, compute in fine-tune equivalents (to the all-blocks
    level and to Flexora's), ratios to Flexora, and the wall seconds beside them."""
    from flexora_tune.report import best_per_seed, finetune_equivalents

    trials = trials.assign(ft=finetune_equivalents(trials))
    per_seed = best_per_seed(trials, metric, mode)
    best = {(r.strategy, r.seed): r for r in per_seed.itertuples(index=False)}
    seeds = sorted({int(s) for s in trials["seed"]})
    strategies = _strategies(trials)
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
                "total_ft": float(group["ft"].fillna(0).sum()),
                "total_compute_s": float(pd_numeric(group["compute_s"]).fillna(0).sum()),
                "all_blocks_val": ref_level,
                "ft_to_all_level": compute_to_reach(group, ref_level, metric, mode),
                "flexora_best_val": flex_level,
                "ft_to_flexora_level": compute_to_reach(group, flex_level, metric, mode),
                "blocks_of_best": row.blocks if row is not None else "",
            })
    by_seed = {(r["strategy"], r["seed"]): r for r in seed_rows}
    summary = []
    for strategy in strategies:
        rows = [r for r in seed_rows if r["strategy"] == strategy]
        out: dict[str, Any] = {"strategy": strategy, "seeds": len(rows)}
        for key in ("best_val", "test_of_best", "total_ft", "total_compute_s"):
            values = [r[key] for r in rows if math.isfinite(r[key])]
            lo, hi = spread(values)
            out[f"{key}_mean"] = sum(values) / len(values) if values else math.nan
            out[f"{key}_min"], out[f"{key}_max"] = lo, hi
        for level in ("all_level", "flexora_level"):
            reached = [r[f"ft_to_{level}"] for r in rows if math.isfinite(r[f"ft_to_{level}"])]
            out[f"{level}_reached_seeds"] = len(reached)
            out[f"ft_to_{level}_median"] = median(reached)
            ratios = []
            for r in rows:
                flex = by_seed.get(("flexora", r["seed"]))
                mine, theirs = r[f"ft_to_{level}"], flex[f"ft_to_{level}"] if flex else math.nan
                if math.isfinite(mine) and math.isfinite(theirs) and theirs > 0:
                    ratios.append(mine / theirs)
            out[f"ratio_to_flexora_{level}_median"] = median(ratios)
            out[f"ratio_to_flexora_{level}_seeds"] = len(ratios)
        summary.append(out)
    return seed_rows, summary


def complete_seeds(trials: Any) -> tuple[Any, list[int]]:
    """The trials of the seeds where every strategy of the table finished a fine-tune, and the other seeds (a
    run stopped early: their strategies would not pair, and a mean over them would mix seeds)."""
    finetunes = trials[(trials["stage"] == "finetune") & (trials["status"] != "ERROR")]
    strategies = set(trials["strategy"])
    seeds = sorted({int(s) for s in trials["seed"]})
    dropped = [s for s in seeds if set(finetunes.loc[finetunes["seed"] == s, "strategy"]) != strategies]
    return trials[~trials["seed"].isin(dropped)], dropped


def paired_tables(trials: Any, references: tuple[str, ...] = PAIRED_REFERENCES, metric: str = "val_accuracy",
                  mode: str = "max") -> list[dict[str, Any]]:
    """Each strategy against each reference that ran: compare's paired verdicts (test and validation accuracy
    of the seed's chosen fine-tune, strategy minus reference, mean and 95% t interval over seeds)."""
    from flexora_tune.report import best_per_seed, paired_verdicts

    per_seed = best_per_seed(trials, metric, mode)
    order = {s: i for i, s in enumerate(_strategies(trials))}
    rows, shown = [], set()
    for reference in references:
        if reference not in order:
            continue
        table = paired_verdicts(per_seed, mode, reference=reference).to_dict("records")
        for r in sorted(table, key=lambda r: order.get(r["strategy"], len(order))):
            pair = frozenset((r["strategy"], reference))
            if r["strategy"] != reference and pair not in shown:  # each pair once, against the first reference
                shown.add(pair)
                rows.append(r)
    return rows


def probe_correlations(trials: Any) -> list[dict[str, Any]]:
    """Per probe strategy and seed: Spearman's rank correlation of the probe's block scores with the final alpha
    of that seed's Flexora search (both from trials.csv)."""
    from flexora_tune.flexora.selection import rank_correlation

    searches = trials[(trials["strategy"] == "flexora") & (trials["stage"] == "search")]
    alpha = {int(r.seed): _floats(r.alpha) for r in searches.itertuples(index=False)}
    rows = []
    for r in trials[trials["stage"] == "probe"].itertuples(index=False):
        scores, flex = _floats(getattr(r, "probe_scores", None)), alpha.get(int(r.seed))
        if scores and flex and len(scores) == len(flex):
            rows.append({"strategy": r.strategy, "seed": int(r.seed), "rank_corr_with_alpha":
                         rank_correlation(scores, flex)})
    return rows


def _floats(value: Any) -> list[float] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    return None


def _reach(row: dict[str, Any], level: str) -> str:
    n, seeds = row[f"{level}_reached_seeds"], row["seeds"]
    if n == 0:
        return "never"
    return f"{row[f'ft_to_{level}_median']:.2f} ({n}/{seeds} seeds)"


def _ratio(row: dict[str, Any], level: str) -> str:
    n = row[f"ratio_to_flexora_{level}_seeds"]
    return "-" if n == 0 else f"{fmt(row[f'ratio_to_flexora_{level}_median'], 2)} ({n} seeds)"


def _interval(mean: Any, lo: Any, hi: Any) -> str:
    if mean is None or mean != mean:
        return "-"
    return f"{mean:+.3f} [{fmt(lo, 3)}, {fmt(hi, 3)}]"


def _dropped(meta: dict[str, Any]) -> str:
    dropped = meta.get("dropped_seeds")
    if not dropped:
        return ""
    return (f" (seeds {', '.join(map(str, dropped))} left out: the run was stopped before every strategy had "
            "finished a fine-tune there; the tables are over the complete seeds)")


def write_markdown(path: Path, summary: list[dict[str, Any]], paired: list[dict[str, Any]],
                   correlations: list[dict[str, Any]], info: dict[str, Any], command: str, load: dict[str, float],
                   meta: dict[str, Any], out: Path) -> None:
    rows = [[
        r["strategy"],
        f"{fmt(r['best_val_mean'], 3)} [{fmt(r['best_val_min'], 3)}, {fmt(r['best_val_max'], 3)}]",
        f"{fmt(r['test_of_best_mean'], 3)} [{fmt(r['test_of_best_min'], 3)}, {fmt(r['test_of_best_max'], 3)}]",
        f"{fmt(r['total_ft_mean'], 2)}", _reach(r, "all_level"), _ratio(r, "all_level"), _reach(r, "flexora_level"),
        _ratio(r, "flexora_level"), f"{r['total_compute_s_mean']:.3g}",
    ] for r in summary]
    shown = os.path.relpath(out, REPO) if out.is_relative_to(REPO) else str(out)
    text = header_markdown("Quality per compute: Flexora against the baselines", info, command, load)
    text += (
        f"- Model `{meta.get('model')}`, task `{json.dumps(meta.get('task'))}`; strategies "
        f"{', '.join(meta.get('strategies', []))}; {meta.get('seeds')} seeds planned"
        f"{_dropped(meta)}; {meta.get('trials')} fine-tune(s) per "
        f"strategy and seed (Flexora and the probes: plus their search or probe trial); budget "
        f"{meta.get('budget') or 'none'} ft; settings `{json.dumps(meta.get('settings'))}`\n"
        f"- compare's folder: `{shown}` (trials.csv, summary.csv, summary.md, plots)\n"
        + (f"- How it ran: {meta['run_note']}\n" if meta.get("run_note") else "") + "\n"
        "Mean [min, max] over seeds of each seed's best fine-tune by validation accuracy, and the test accuracy "
        "of that same trial. Compute is in *fine-tune equivalents* (ft): estimated training FLOPs over one "
        "all-blocks fine-tune of the same seed, searches and probes included, a number other load cannot move. "
        "*to all-blocks level*: median ft (trials in start order) until a fine-tune first reached the all-blocks "
        "LoRA's validation accuracy of the same seed; *ratio*: that compute over Flexora's, median over seeds "
        "where both reached it (> 1: more compute than Flexora). The same at Flexora's own best level. Wall "
        "seconds (last column) depend on the machine's load.\n\n"
    )
    text += markdown_table(["strategy", "best val", "test of best", "compute (ft)", "to all-blocks level (ft)",
                            "ratio to Flexora", "to Flexora's level (ft)", "ratio to Flexora", "compute (s)"], rows)
    if paired:
        text += ("\n\n## Paired differences\n\nSeed by seed, the strategy's chosen fine-tune minus the "
                 "reference's (same seed: same data split and order): mean, 95% Student t interval over seeds, and "
                 "the verdict at 95% (*no difference* when the interval holds zero).\n\n")
        text += markdown_table(
            ["strategy", "vs", "seeds", "Δ test accuracy", "verdict", "Δ val accuracy", "verdict"],
            [[p["strategy"], p["reference"], p["n_pairs"],
              _interval(p["test_diff_mean"], p["test_diff_lo"], p["test_diff_hi"]), p["test_verdict"],
              _interval(p["val_diff_mean"], p["val_diff_lo"], p["val_diff_hi"]), p["val_verdict"]] for p in paired])
    if correlations:
        text += ("\n\n## Probe rankings against Flexora's alpha\n\nSpearman's rank correlation, per seed, of each "
                 "probe's block scores with the final alpha of the same seed's Flexora search (1: same order; 0: "
                 "unrelated); every seed whose search and probe finished, complete or not.\n\n")
        from flexora_tune.report import mean_confidence_interval

        probes = sorted({c["strategy"] for c in correlations})
        table = []
        for probe in probes:
            values = [c["rank_corr_with_alpha"] for c in correlations if c["strategy"] == probe]
            mean, lo, hi, n = mean_confidence_interval(values)
            table.append([probe, n, ", ".join(f"{v:+.2f}" for v in values), _interval(mean, lo, hi)])
        text += markdown_table(["probe", "seeds", "per seed", "mean [95% interval]"], table)
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
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=f"comma-separated (default: "
                        f"{DEFAULT_STRATEGIES})")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per strategy (default 5)")
    parser.add_argument("--trials", type=int, default=1, help="fine-tunes per strategy and seed (default 1)")
    parser.add_argument("--budget", type=float, default=None,
                        help="fine-tune equivalents per strategy and seed, searches included (default: none)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="compute seconds per strategy and seed, searches included (default: none)")
    parser.add_argument("--k", type=int, default=None, help="blocks for first-k/last-k/random (default: Flexora's)")
    parser.add_argument("--set", action="append", type=parse_setting, metavar="KEY=VALUE",
                        help="a trial setting (JSON value), repeatable: max_steps=200, eval_every=50, lr=2e-4, "
                             "search.steps=100 (nested: search only)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs (torch threads) per trial (default 1)")
    parser.add_argument("--storage-path", default=None,
                        help="Ray Tune storage (default: <out>/ray; a temporary folder for --model tiny)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")
    parser.add_argument("--analyse-only", action="store_true",
                        help="run nothing: analyse the finished comparison in --out (its command from meta.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="compare's folder (default benchmarks/results/<name>)")
    parser.add_argument("--name", default=None,
                        help="result stem (default quality_per_compute, or quality_per_compute_tiny_smoke)")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace, out: Path, load: LoadSampler) -> None:
    from flexora_tune.compare import compare

    settings = build_settings(args.set or [])
    strategies = tuple(s for s in args.strategies.split(",") if s)
    with tempfile.TemporaryDirectory(prefix="flexora_qpc_") as tmp:
        model, task = _tiny(Path(tmp)) if args.model == "tiny" else (args.model, args.task)
        overrides = {"max_length": args.max_length, "val_size": args.val_size, "test_size": args.test_size}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            task = {"source": task, **overrides}
        compare(out=out, model=model, task=task, strategies=strategies, seeds=args.seeds, trials=args.trials,
                budget=args.budget, budget_s=args.budget_s, k=args.k, settings=settings,
                storage_path=args.storage_path or (str(Path(tmp) / "ray") if args.model == "tiny" else None),
                max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial, resume=args.resume)
    load.stop()
    write_json(out / RUN_FILE, {"command": os.environ["FLEXORA_TUNE_COMMAND"], "machine": machine_info(),
                                "started": load.started, "load": load.summary()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    strategies = tuple(s for s in args.strategies.split(",") if s)
    if not args.analyse_only and ("flexora" not in strategies or REFERENCE not in strategies):
        raise SystemExit("the ratios need both 'flexora' and 'all' among the strategies")
    name = args.name or ("quality_per_compute_tiny_smoke" if args.model == "tiny" else "quality_per_compute")
    out = (args.out or RESULTS / name).resolve()
    from flexora_tune.report import read_trials

    if not args.analyse_only:
        load = LoadSampler()
        load.start()
        os.environ["FLEXORA_TUNE_COMMAND"] = command_line()
        _run(args, out, load)
    meta = json.loads((out / "meta.json").read_text())
    run = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
    info = run.get("machine") or machine_info()
    command, load_summary = run.get("command") or meta.get("command", ""), run.get("load")
    if run.get("note"):
        meta["run_note"] = run["note"]
    everything = read_trials(out)
    trials, dropped = complete_seeds(everything)
    if dropped:
        meta["dropped_seeds"] = dropped
        print(f"[quality_per_compute] left out seeds {dropped}: not every strategy finished a fine-tune there "
              "(the run was stopped before them)", flush=True)
    seed_rows, summary = analyse(trials, meta.get("metric", "val_accuracy"), meta.get("mode", "max"))
    paired = paired_tables(trials, metric=meta.get("metric", "val_accuracy"), mode=meta.get("mode", "max"))
    correlations = probe_correlations(everything)  # needs only the searches and probes, which every seed has
    for directory in {out, RESULTS}:
        directory.mkdir(parents=True, exist_ok=True)
        write_csv(directory / f"{name}.csv", summary)
        write_csv(directory / f"{name}_per_seed.csv", seed_rows)
        write_csv(directory / f"{name}_paired.csv", paired)
        if correlations:
            write_csv(directory / f"{name}_probe_correlations.csv", correlations)
        write_markdown(directory / f"{name}.md", summary, paired, correlations, info, command, load_summary, meta,
                       out)
    for r in summary:
        print(f"{r['strategy']:>9}: val {fmt(r['best_val_mean'], 3)} test {fmt(r['test_of_best_mean'], 3)} "
              f"compute {fmt(r['total_ft_mean'], 2)} ft, to all-level {_reach(r, 'all_level')}")
    print(f"[quality_per_compute] wrote {RESULTS / name}.md and {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
