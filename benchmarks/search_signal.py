"""Does Flexora's search find signal? Its default against cheap ways to get more signal per FLOP, several seeds.

Variants (search settings over the defaults):

- ``default``: the default search (12 steps in the small-data regime, 1 search-validation batch per gate step,
  alpha_lr 0.01, stop-when-stable 4);
- ``val-batches-2``, ``val-batches-4``: 2 or 4 search-validation batches per gate step (a less noisy
  hypergradient);
- ``alpha-lr-5x``: alpha_lr 0.05;
- ``long-18``, ``long-36``: up to 18 or 36 steps, still ended by stop-when-stable;
- ``consensus-3``: three default searches per seed (seeds s, s + 1000, s + 2000), their majority vote.

Phase 1, every variant: its searches, run in this process through the same trial config the Tune trainable
parses (results cached under `--out`; the default variant's seeds come from `--baseline` when given). Per
variant: the agreement across seeds of the subset each seed would fine-tune (mean pairwise Jaccard against
random subsets of the same sizes, permutation p-value, `flexora_tune.stability.agreement_test`), alpha's
separation, and the compute in fine-tune equivalents (FLOPs over one all-blocks fine-tune): the searches, and
the pipeline (searches plus the fine-tune of the selection, `flexora_tune.finetune.finetune_flops`, exact).

Phase 2, for the variants in `--finetune` (default ``auto``: the cheapest that qualifies, i.e. agreement
p < 0.05 and a pipeline of at most 1.5 fine-tune equivalents on every seed): one
`flexora_tune.compare.compare` of ``flexora`` and ``random`` (k = that seed's Flexora size), one fine-tune per
seed, and the paired test- and validation-accuracy differences against random-k and against all blocks (the
all-blocks fine-tunes of `--baseline`, a comparison of flexora, random and all with the same task, settings
and seeds; its flexora and random rows are the default variant's phase 2). With `--rule last-k` (or first-k),
also against that static rule at the same k: one fine-tune per seed and k, run in this process through the
trial's own config parsing and cached under `--out`.

    .venv/bin/python benchmarks/search_signal.py --seeds 5 --cpus-per-trial 2 --max-length 48 --val-size 150 \\
        --test-size 300 --set max_train_examples=96 --set epochs=5 --set lr=5e-3 --set eval_every=1000000 \\
        --baseline benchmarks/results/quality_per_compute
    .venv/bin/python benchmarks/search_signal.py --model tiny --seeds 3 --variants default,consensus-3 \\
        --finetune consensus-3 --max-length 32 --set max_steps=6 --set lr=0.01 --set search.steps=4  # minutes
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
from quality_per_compute import _tiny, build_settings, parse_setting, pd_numeric  # noqa: E402
from selection_vs_rules import RULES  # noqa: E402

#: name -> (search settings over the defaults, searches per seed)
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "default": ({}, 1),
    "alpha-lr-5x": ({"alpha_lr": 0.05}, 1),
    "val-batches-2": ({"val_batches": 2}, 1),
    "val-batches-4": ({"val_batches": 4}, 1),
    "long-18": ({"steps": 18}, 1),
    "long-36": ({"steps": 36}, 1),
    "consensus-3": ({}, 3),
}
#: What runs without --variants: the default and the variants whose pipeline can stay within MAX_PIPELINE_FT
#: in the small-data regime (a default search costs about 0.35 of an all-blocks fine-tune there, the fine-tune
#: of its selection up to about 1: room for about 1.5 searches' worth, not for 2 or 3).
DEFAULT_VARIANTS = ("default", "alpha-lr-5x", "val-batches-2", "long-18")
#: A variant qualifies as a default when its selections agree beyond chance and its pipeline stays this cheap.
MAX_PIPELINE_FT = 1.5
SIGNIFICANCE = 0.05
MODE = "max"
SEED_STRIDE = 1000


def _finished(out: Path) -> bool:
    done = out / "finished_experiments.json"
    return done.exists() and "comparison" in json.loads(done.read_text())


def _check_baseline(baseline: Path, task: Any, settings: dict[str, Any], seeds: int) -> None:
    """Refuse a baseline that ran another task, settings or fewer seeds: its fine-tunes would not pair."""
    meta = json.loads((baseline / "meta.json").read_text())
    wanted = json.loads(json.dumps({"task": task, "settings": settings}, default=str))
    got = {"task": meta.get("task"), "settings": meta.get("settings")}
    if wanted != got or meta.get("seeds", 0) < seeds:
        raise SystemExit(f"--baseline {baseline} ran {got} with {meta.get('seeds')} seeds, not {wanted} with {seeds}")
    if not {"flexora", "random", "all"} <= set(meta.get("strategies", [])):
        raise SystemExit(f"--baseline {baseline} must have run flexora, random and all")


def _settings(settings: dict[str, Any], variant: str) -> dict[str, Any]:
    merged = json.loads(json.dumps(settings))
    merged.setdefault("search", {}).update(VARIANTS[variant][0])
    if not merged["search"]:
        del merged["search"]
    return merged


def search_record(model: str, task: Any, settings: dict[str, Any], seed: int, cache: Path) -> dict[str, Any]:
    """One search's blocks, alpha, FLOPs and separation, run as a Tune search trial would run it (the same
    config parsing), cached in `cache` (a JSON file per search)."""
    path = cache / f"seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    from flexora_tune.flexora import search_layers
    from flexora_tune.tune_trainable import parse_config

    trial = parse_config({"model": model, "task": task, "seed": seed, "stage": "search", **settings})
    result = search_layers(trial.model, trial.task, trial.seed, finetune=dict(trial.finetune_settings),
                           **trial.settings)
    record = {"seed": seed, "blocks": list(result.blocks), "alpha": list(result.alpha), "flops": result.flops,
              "alpha_separation": result.alpha_separation, "steps": result.steps, "compute_s": result.compute_s,
              "num_blocks_total": result.num_blocks_total}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    print(f"[search_signal] search seed {seed} {settings.get('search', {})}: blocks {record['blocks']} "
          f"({result.steps} steps, {result.compute_s:.0f}s)", flush=True)
    return record


def _baseline_searches(base: Any) -> dict[int, dict[str, Any]]:
    from flexora_tune.blocks import parse_blocks

    rows = base[(base["strategy"] == "flexora") & (base["stage"] == "search")]
    separation = pd_numeric(rows["alpha_separation"]) if "alpha_separation" in rows.columns else None
    return {int(r.seed): {"seed": int(r.seed), "blocks": list(parse_blocks(r.blocks)), "flops": float(r.flops),
                          "alpha_separation": None if separation is None or math.isnan(separation.iloc[i])
                          else float(separation.iloc[i]), "num_blocks_total": int(r.num_blocks_total)}
            for i, r in enumerate(rows.itertuples(index=False))}


def phase1(variant: str, model: str, task: Any, settings: dict[str, Any], seeds: int, out: Path,
           reused: dict[int, dict[str, Any]], unit: float) -> dict[str, Any]:
    """A variant's searches on every seed: agreement of the selections it would fine-tune, separation, cost."""
    from flexora_tune.finetune import finetune_flops
    from flexora_tune.search.flexora import consensus
    from flexora_tune.stability import agreement_test
    from flexora_tune.tune_trainable import parse_config

    merged, searches = _settings(settings, variant), VARIANTS[variant][1]
    cache = out / "searches" / variant
    chosen, search_ft, pipeline, separations = [], [], [], []
    for seed in range(seeds):
        records = []
        for i in range(searches):
            search_seed = seed + SEED_STRIDE * i
            default_settings = not VARIANTS[variant][0]
            if default_settings and search_seed in reused:
                records.append(reused[search_seed])
            else:
                records.append(search_record(model, task, merged, search_seed, cache))
        blocks = consensus([r["blocks"] for r in records]) if searches > 1 else tuple(records[0]["blocks"])
        ft = parse_config({"model": model, "task": task, "seed": seed, "blocks": list(blocks), **merged},
                          num_blocks=records[0]["num_blocks_total"])
        tune_flops = finetune_flops(model, task, list(blocks), seed, **ft.settings)
        spent = sum(r["flops"] for r in records) / unit
        chosen.append(blocks)
        search_ft.append(spent)
        pipeline.append(spent + tune_flops / unit)
        separations += [r["alpha_separation"] for r in records if r.get("alpha_separation") is not None]
    test = agreement_test(chosen, records[0]["num_blocks_total"])
    row = {"variant": variant, "seeds": seeds, "searches_per_seed": searches,
           "k_mean": sum(map(len, chosen)) / len(chosen), "jaccard": test.observed,
           "jaccard_random": test.expected, "p_value": test.p_value,
           "separation_mean": sum(separations) / len(separations) if separations else math.nan,
           "search_ft_mean": sum(search_ft) / seeds, "pipeline_ft_mean": sum(pipeline) / seeds,
           "pipeline_ft_max": max(pipeline), "selections": "; ".join(",".join(map(str, b)) for b in chosen)}
    row["qualifies"] = bool(row["p_value"] < SIGNIFICANCE and row["pipeline_ft_max"] <= MAX_PIPELINE_FT)
    print(f"[search_signal] {variant}: Jaccard {fmt(row['jaccard'], 3)} vs {fmt(row['jaccard_random'], 3)} "
          f"p {fmt(row['p_value'], 3)}; pipeline {fmt(row['pipeline_ft_mean'], 2)} ft (max "
          f"{fmt(row['pipeline_ft_max'], 2)}); qualifies: {row['qualifies']}", flush=True)
    return row


def run_variant(variant: str, out: Path, model: str, task: Any, settings: dict[str, Any], seeds: int,
                cpus_per_trial: float, storage: str | None) -> Any:
    """Phase 2: the variant's comparison of flexora and random (one fine-tune per seed), or its finished
    results."""
    from flexora_tune.compare import compare
    from flexora_tune.report import read_trials

    if _finished(out):
        print(f"[search_signal] {variant}: fine-tunes finished earlier, reading {out}", flush=True)
        return read_trials(out)
    return compare(out=out, model=model, task=task, strategies=("flexora", "random"), seeds=seeds, trials=1,
                   searches=VARIANTS[variant][1], settings=_settings(settings, variant),
                   cpus_per_trial=cpus_per_trial, reference="random", storage_path=storage)


def _paired(diffs: list[float]) -> dict[str, Any]:
    from flexora_tune.report import mean_confidence_interval
    from flexora_tune.report.paired import verdict

    mean, lo, hi, n = mean_confidence_interval(diffs)
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "verdict": verdict(lo, hi, n, MODE)}


def phase2(variant: str, trials: Any, all_rows: Any, seeds: int) -> dict[str, Any]:
    """The variant's fine-tunes: Flexora's test accuracy and its paired differences from random-k and all."""
    import pandas as pd

    frame = pd.concat([trials[trials["strategy"].isin(["flexora", "random"])], all_rows], ignore_index=True)
    frame = frame[pd.to_numeric(frame["seed"], errors="coerce") < seeds]
    finetunes = frame[(frame["stage"] == "finetune") & (frame["status"] != "ERROR")]
    first = finetunes.sort_values("start_time", kind="stable").groupby(["strategy", "seed"]).head(1)
    chosen = {(r.strategy, int(r.seed)): r for r in first.itertuples(index=False)}
    flexora = sorted(s for (strategy, s) in chosen if strategy == "flexora")
    row: dict[str, Any] = {
        "variant": variant, "finetuned_seeds": len(flexora),
        "flexora_test_mean": float(pd.Series([chosen[("flexora", s)].test_accuracy for s in flexora]).mean()),
        "finetuned_selections": "; ".join(str(chosen[("flexora", s)].blocks) for s in flexora),
        "flexora_seeds": flexora,
        "flexora_val_per_seed": [float(chosen[("flexora", s)].val_accuracy) for s in flexora],
        "flexora_test_per_seed": [float(chosen[("flexora", s)].test_accuracy) for s in flexora],
    }
    for reference in ("random", "all"):
        for metric, column in (("test", "test_accuracy"), ("val", "val_accuracy")):
            diffs = [float(getattr(chosen[("flexora", s)], column)) - float(getattr(chosen[(reference, s)], column))
                     for s in flexora if (reference, s) in chosen]
            for key, value in _paired(diffs).items():
                row[f"{metric}_vs_{reference}_{key}"] = value
    return row


def rule_accuracies(rule: str, seeds: list[int], selections: str, model: str, task: Any, settings: dict[str, Any],
                    num_blocks: int, cache: Path) -> dict[int, dict[str, float]]:
    """Per seed, the fine-tune of `rule`'s blocks at the size of that seed's selection (`selections`: one
    subset per seed of `seeds`, in that order): its validation and test accuracy, cached in `cache`."""
    from flexora_tune.finetune import finetune
    from flexora_tune.tune_trainable import parse_config

    out = {}
    for seed, subset in zip(seeds, _subsets(selections), strict=True):
        blocks = sorted(RULES[rule](len(subset), num_blocks))
        path = cache / f"seed{seed}_k{len(subset)}.json"
        if not path.exists():
            ft = parse_config({"model": model, "task": task, "seed": seed, "blocks": blocks, **settings},
                              num_blocks=num_blocks)
            result = finetune(ft.model, ft.task, ft.selection, seed, **ft.settings)
            cache.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"seed": seed, "blocks": blocks, "val_accuracy": result.val_accuracy,
                                        "test_accuracy": result.test_accuracy, "compute_s": result.compute_s}))
            print(f"[search_signal] {rule} seed {seed} k {len(subset)}: test {result.test_accuracy:.3f} "
                  f"({result.compute_s:.0f}s)", flush=True)
        out[seed] = json.loads(path.read_text())
    return out


def add_rule(row: dict[str, Any], rule: str, reference: dict[int, dict[str, float]]) -> None:
    """Paired differences of the phase-2 row's Flexora fine-tunes (its `flexora_seeds`) from the rule's, into `row`
    as ``<metric>_vs_<rule>_*``."""
    for metric in ("test", "val"):
        diffs = [mine - reference[s][f"{metric}_accuracy"]
                 for s, mine in zip(row["flexora_seeds"], row[f"flexora_{metric}_per_seed"], strict=True)]
        for key, value in _paired(diffs).items():
            row[f"{metric}_vs_{rule}_{key}"] = value


def _subsets(text: str) -> list[frozenset[int]]:
    from flexora_tune.blocks import parse_blocks

    return [frozenset(parse_blocks(part.strip()) or ()) for part in text.split(";") if part.strip()]


def _same_label(same: bool | None) -> str:
    return "not searched here" if same is None else "yes" if same else "NO"


def _diff(row: dict[str, Any], metric: str, reference: str) -> str:
    p = f"{metric}_vs_{reference}_"
    if not row.get(p + "n"):
        return "-"
    return f"{row[p + 'mean']:+.3f} [{fmt(row[p + 'lo'], 3)}, {fmt(row[p + 'hi'], 3)}] {row[p + 'verdict']}"


def write_markdown(path: Path, rows: list[dict[str, Any]], tuned: list[dict[str, Any]], info: dict[str, Any],
                   command: str, load: dict[str, float], args: argparse.Namespace, out: Path) -> None:
    text = header_markdown("Search signal: do the selections agree across seeds beyond chance?", info, command,
                           load)
    text += (
        f"- Model `{args.model}`, task `{args.task}`; {args.seeds} seeds; settings "
        f"`{json.dumps(build_settings(args.set or []))}`; searches and comparisons under `{out}`\n\n"
        "## Phase 1: the searches\n\nPer variant, over seeds: *k* the mean size of the subset the seed would "
        "fine-tune (consensus-3: the majority vote of its three searches); *Jaccard*: the mean pairwise "
        "Jaccard of those subsets against the expectation for random subsets of the same sizes, and the "
        "permutation p-value (10,000 draws); *separation*: alpha's spread over what pure noise reaches in as many "
        "Adam steps (about 1: noise; 3: separated); *search ft* and *pipeline ft*: compute of the searches, and "
        "of searches plus the fine-tune of the selection, in all-blocks fine-tunes of the same seed (FLOPs, mean "
        f"and max over seeds). *qualifies*: p < {SIGNIFICANCE} and a pipeline of at most {MAX_PIPELINE_FT} on "
        "every seed.\n\n"
    )
    text += markdown_table(
        ["variant", "searches/seed", "k", "Jaccard vs random", "p", "separation", "search ft", "pipeline ft",
         "qualifies"],
        [[r["variant"], r["searches_per_seed"], fmt(r["k_mean"], 1),
          f"{fmt(r['jaccard'], 3)} vs {fmt(r['jaccard_random'], 3)}", fmt(r["p_value"], 3),
          fmt(r["separation_mean"], 2), fmt(r["search_ft_mean"], 2),
          f"{fmt(r['pipeline_ft_mean'], 2)} (max {fmt(r['pipeline_ft_max'], 2)})",
          "yes" if r["qualifies"] else "no"] for r in rows])
    text += "\n\nSubsets per seed (seed 0 first):\n\n"
    text += "\n".join(f"- {r['variant']}: {r['selections']}" for r in rows) + "\n"
    if tuned:
        text += ("\n## Phase 2: the fine-tunes\n\nFlexora's fine-tune of that subset, one per seed, against "
                 "random-k (same seed, same k) and all blocks (same seed): the paired difference (Flexora minus "
                 "the reference), mean and 95% t interval over seeds, and the verdict at 95%.\n\n")
        rules = [args.rule] if args.rule else []
        text += markdown_table(
            ["variant", "seeds", "subsets as in phase 1", "Flexora test acc", "Δ test vs random-k", "Δ test vs all",
             *[f"Δ test vs {r}" for r in rules], "Δ val vs random-k", "Δ val vs all",
             *[f"Δ val vs {r}" for r in rules]],
            [[t["variant"], t["finetuned_seeds"], _same_label(t["same_subsets_as_phase1"]),
              fmt(t["flexora_test_mean"], 3), _diff(t, "test", "random"), _diff(t, "test", "all"),
              *[_diff(t, "test", r) for r in rules], _diff(t, "val", "random"), _diff(t, "val", "all"),
              *[_diff(t, "val", r) for r in rules]] for t in tuned])
        text += "\n"
        several = [t["variant"] for t in tuned if VARIANTS[t["variant"]][1] > 1]
        if several:
            text += (f"\n{', '.join(several)}: `compare` sizes random-k by the seed's first search (it does not wait "
                     "for the consensus), so where the consensus's size differs its random-k is not of the same k; "
                     "the rule column, sized by the fine-tuned subset, is.\n")
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name/path, or 'tiny' for a smoke test")
    parser.add_argument("--task", default="default", help="task name or file (default: BBC News; also bbc-lm)")
    parser.add_argument("--max-length", type=int, default=None, help="token cut-off per example")
    parser.add_argument("--val-size", type=int, default=None, help="validation examples")
    parser.add_argument("--test-size", type=int, default=None, help="test examples")
    parser.add_argument("--seeds", type=int, default=5, help="seeds (default 5)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated from {', '.join(VARIANTS)} (default: {', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--finetune", default="auto",
                        help="variants whose selections are fine-tuned (phase 2), comma-separated; 'auto': the "
                             "cheapest that qualifies; 'none' (phase 1 only, no --baseline needed)")
    parser.add_argument("--set", action="append", type=parse_setting, metavar="KEY=VALUE",
                        help="a trial setting (JSON value), repeatable; search.steps=4 nests")
    parser.add_argument("--cpus-per-trial", type=float, default=2, help="CPUs (torch threads) per trial")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a finished compare folder with flexora, random and all on the same task, settings and "
                             "seeds: the default variant's searches and fine-tunes, and the all-blocks reference")
    parser.add_argument("--out", type=Path, default=None, help="folder of the searches and comparisons "
                        "(default results/<name>)")
    parser.add_argument("--rule", choices=sorted(RULES), default=None,
                        help="also compare each phase-2 variant with this static rule at the same k (one fine-tune "
                             "per seed)")
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
    import torch

    from flexora_tune.finetune import finetune_flops
    from flexora_tune.report import read_trials
    from flexora_tune.tune_trainable import parse_config

    torch.set_num_threads(max(1, int(args.cpus_per_trial)))
    settings = build_settings(args.set or [])
    with tempfile.TemporaryDirectory(prefix="flexora_signal_") as tmp:
        model, task = _tiny(Path(tmp)) if args.model == "tiny" else (args.model, args.task)
        overrides = {"max_length": args.max_length, "val_size": args.val_size, "test_size": args.test_size}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        task = {"source": task, **overrides} if overrides else task
        storage = str(Path(tmp) / "ray") if args.model == "tiny" else None
        searches_only = args.finetune == "none"
        if args.baseline is not None:
            _check_baseline(args.baseline.resolve(), task, settings, args.seeds)
            base = read_trials(args.baseline)
        elif not searches_only:
            base = run_baseline(out / "baseline", model, task, settings, args.seeds, args.cpus_per_trial, storage)
        all_ft = parse_config({"model": model, "task": task, "seed": 0, **settings})
        unit = finetune_flops(model, task, None, 0, **all_ft.settings)
        reused = _baseline_searches(base) if args.baseline is not None or not searches_only else {}
        rows = [phase1(v, model, task, settings, args.seeds, out, reused, unit) for v in variants]
        tuned: list[dict[str, Any]] = []
        if searches_only:
            chosen = []
        elif args.finetune == "auto":
            qualified = sorted((r for r in rows if r["qualifies"] and r["variant"] != "default"),
                               key=lambda r: r["pipeline_ft_mean"])
            chosen = [qualified[0]["variant"]] if qualified else []
            print(f"[search_signal] fine-tuning {chosen or 'no variant: none qualifies'}", flush=True)
        else:
            chosen = [v for v in args.finetune.split(",") if v and v != "none"]
        if not searches_only:
            all_rows = base[base["strategy"] == "all"]
            tuned.append(phase2("default", base, all_rows, args.seeds))
        for variant in chosen:
            if variant != "default":
                trials = run_variant(variant, out / variant, model, task, settings, args.seeds, args.cpus_per_trial,
                                     storage)
                tuned.append(phase2(variant, trials, all_rows, args.seeds))
        by_variant = {r["variant"]: r for r in rows}
        num_blocks = int(pd_numeric(base["num_blocks_total"]).dropna().iloc[0]) if tuned else 0
        for t in tuned:
            planned = by_variant.get(t["variant"])
            t["same_subsets_as_phase1"] = (None if planned is None
                                           else _subsets(planned["selections"]) == _subsets(t["finetuned_selections"]))
            if args.rule:
                reference = rule_accuracies(args.rule, t["flexora_seeds"], t["finetuned_selections"], model, task,
                                            settings, num_blocks, out / "rules" / args.rule)
                add_rule(t, args.rule, reference)
    load.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_csv(RESULTS / f"{name}.csv", rows)
    write_csv(RESULTS / f"{name}_finetunes.csv", tuned)
    write_json(RESULTS / f"{name}.json", {"command": command, "machine": info, "load": load.summary(),
                                          "searches": rows, "finetunes": tuned})
    write_markdown(RESULTS / f"{name}.md", rows, tuned, info, command, load.summary(), args, out)
    print(f"[search_signal] wrote {RESULTS / name}.md", flush=True)
    return 0


def run_baseline(out: Path, model: str, task: Any, settings: dict[str, Any], seeds: int, cpus_per_trial: float,
                 storage: str | None) -> Any:
    """Without `--baseline`: flexora, random and all with the default search (the reference rows)."""
    from flexora_tune.compare import compare
    from flexora_tune.report import read_trials

    if _finished(out):
        return read_trials(out)
    return compare(out=out, model=model, task=task, strategies=("flexora", "random", "all"), seeds=seeds, trials=1,
                   settings=settings, cpus_per_trial=cpus_per_trial, storage_path=storage)


if __name__ == "__main__":
    raise SystemExit(main())
