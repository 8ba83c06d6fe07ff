"""Scheduling overhead: trials per minute through each layer searcher of flexora_tune against Ray Tune's own
default search (`BasicVariantGenerator`), with a trivial trainable, as ratios (aim: >= 0.9 of Ray's own).

The trainable does no work: it reports once and returns. A search trial (``stage == "search"``, suggested by
`FlexoraSearcher`) reports what a Flexora search would (``blocks``, ``alpha``, ``num_blocks_total``, NaN
``val_accuracy``); a fine-tune trial reports a ``val_accuracy`` computed from its block subset, so TPE has
something to learn from. So trials/min measures the searcher plus Tune's own trial handling (actor start,
result processing, experiment-state saving), nothing else.

Searchers (all with `num_blocks` given, so no model is loaded): flexora (FlexoraSearcher: `--searches` search
trials, then fine-tunes of their selection and its top-(k+-1) neighbours, one per fine-tune seed; its barrier
between searches and fine-tunes is part of the method and is measured), random (RandomLayerSearcher), tpe
(tpe_searcher: Ray's OptunaSearch), static (StaticLayerSearcher, last-k for each seed) and ray (Ray's
BasicVariantGenerator over the same per-block 0/1 space). Every searcher runs the same number of trials: the
number FlexoraSearcher makes. One shared `ray.init(num_cpus=2)`; the searchers run interleaved, in rotated
order, `--repeats` times. Also reported: the searcher's own cost per trial (suggest + result + complete,
driven in a plain loop without Ray).

    .venv/bin/python benchmarks/tune_overhead.py
    .venv/bin/python benchmarks/tune_overhead.py --trials 20 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
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
    median,
    spread,
    write_csv,
    write_json,
)

SEARCHERS = ("ray", "flexora", "random", "tpe", "static")
METRIC, MODE = "val_accuracy", "max"


def trivial_result(config: dict[str, Any]) -> dict[str, Any]:
    """What the trivial trainable reports for `config`: a search trial's selection (the first quarter of the
    blocks, alpha falling with the block index) or a fine-tune's accuracy from its subset."""
    total = int(config["num_blocks_total"])
    if config.get("stage") == "search":
        k = max(2, total // 4)
        alpha = [round(1.0 - 2.0 * i / max(1, total - 1), 6) for i in range(total)]
        return {"blocks": ",".join(str(b) for b in range(k)), "alpha": alpha, "num_blocks_total": total,
                "val_accuracy": math.nan, "stage": "search"}
    layers = config.get("layers") or {}
    chosen = [int(key[1:]) for key, on in layers.items() if on] or list(range(total))
    value = 0.5 + 0.4 * sum(math.sin(1.0 + b) ** 2 for b in chosen) / total
    return {"val_accuracy": value, "stage": "finetune", "blocks": ",".join(map(str, sorted(chosen)))}


def trivial_trainable(config: dict[str, Any]) -> None:
    """A Tune function trainable that reports `trivial_result(config)` once and returns."""
    from ray import tune

    tune.report(trivial_result(config))


def make_searcher(name: str, trials: int, num_blocks: int, searches: int, seed: int) -> tuple[Any, int]:
    """The search algorithm for `name` and the `num_samples` to give Tune."""
    from ray.tune.search import BasicVariantGenerator

    from flexora_tune.search import FlexoraSearcher, RandomLayerSearcher, StaticLayerSearcher, tpe_searcher

    if name == "ray":
        return BasicVariantGenerator(random_state=seed), trials
    if name == "flexora":
        searcher = FlexoraSearcher(METRIC, MODE, search_seeds=list(range(searches)),
                                   finetune_seeds=list(range(flexora_finetune_seeds(trials, searches))),
                                   neighbours=1)
        return searcher, searcher.planned_trials
    if name == "random":
        return RandomLayerSearcher(METRIC, MODE, num_blocks=num_blocks, max_trials=trials, seed=seed), trials
    if name == "tpe":
        return tpe_searcher(METRIC, MODE, num_blocks=num_blocks, seed=seed), trials
    if name == "static":
        k = max(1, num_blocks // 4)
        return StaticLayerSearcher(METRIC, MODE, rule="last", k=k, seeds=list(range(trials)),
                                   num_blocks=num_blocks), trials
    raise ValueError(f"unknown searcher {name!r}; choose from {SEARCHERS}")


def flexora_finetune_seeds(trials: int, searches: int) -> int:
    """Fine-tune seeds so FlexoraSearcher makes about `trials` trials: `searches` searches that all select the
    same blocks, then 3 subsets (selection, top-(k-1), top-(k+1)) per fine-tune seed."""
    return max(1, round((trials - searches) / 3))


def param_space(name: str, num_blocks: int) -> dict[str, Any]:
    """The Tune config: the block count for the trivial trainable, plus, for Ray's own search, one random 0/1
    choice per block (the space RandomLayerSearcher and TPE search)."""
    from ray import tune

    from flexora_tune.search import layer_key

    space: dict[str, Any] = {"num_blocks_total": num_blocks}
    if name == "ray":
        space["stage"] = "finetune"
        space["layers"] = {layer_key(i, num_blocks): tune.choice([0, 1]) for i in range(num_blocks)}
    return space


def run_tune(name: str, trials: int, num_blocks: int, searches: int, seed: int, storage: str) -> dict[str, Any]:
    """Run one experiment through Tune and time it."""
    from ray import tune

    searcher, samples = make_searcher(name, trials, num_blocks, searches, seed)
    tuner = tune.Tuner(
        trivial_trainable,
        param_space=param_space(name, num_blocks),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=samples),
        run_config=tune.RunConfig(name=f"{name}_{seed}_{time.time_ns()}", storage_path=storage, verbose=0),
    )
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    done = [r for r in grid if r.error is None and r.metrics]
    return {"searcher": name, "seed": seed, "trials": len(grid), "ok": len(done), "errors": len(grid) - len(done),
            "wall_s": wall, "trials_per_min": 60.0 * len(grid) / wall}


def searcher_cost(name: str, trials: int, num_blocks: int, searches: int, seed: int) -> float:
    """Seconds per trial spent in the searcher itself (suggest, on_trial_result, on_trial_complete), driven
    sequentially without Ray; for Ray's BasicVariantGenerator, in its `next_trial` loop."""
    if name == "ray":
        return _variant_generator_cost(trials, num_blocks, seed)
    searcher, samples = make_searcher(name, trials, num_blocks, searches, seed)
    searcher.set_search_properties(METRIC, MODE, {"num_blocks_total": num_blocks})
    started, count = time.perf_counter(), 0
    for i in range(samples):
        trial_id = f"t{i}"
        config = searcher.suggest(trial_id)
        if config is None or isinstance(config, str):
            break
        result = {**trivial_result({"num_blocks_total": num_blocks, **config}), "training_iteration": 1}
        searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)
        count += 1
    return (time.perf_counter() - started) / max(1, count)


def _variant_generator_cost(trials: int, num_blocks: int, seed: int) -> float:
    from ray.tune.search import BasicVariantGenerator

    generator = BasicVariantGenerator(random_state=seed)
    started = time.perf_counter()
    generator.add_configurations({"bench": {"run": trivial_trainable, "num_samples": trials,
                                            "config": param_space("ray", num_blocks)}})
    count = 0
    while generator.next_trial() is not None:
        count += 1
    return (time.perf_counter() - started) / max(1, count)


def interleaved(names: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, searcher) in rotated order per repeat, so drift in the machine's load hits all alike."""
    order = []
    for rep in range(repeats):
        shift = rep % len(names)
        order += [(rep, n) for n in names[shift:] + names[:shift]]
    return order


def summarize(runs: list[dict[str, Any]], costs: dict[str, float]) -> list[dict[str, Any]]:
    """Per searcher: median trials/min over repeats, range, and the ratio to Ray's own (median of per-repeat
    ratios and ratio of medians)."""
    ref = median(r["trials_per_min"] for r in runs if r["searcher"] == "ray")
    rows = []
    for name in dict.fromkeys(r["searcher"] for r in runs):
        mine = [r for r in runs if r["searcher"] == name]
        paired = []
        for r in mine:
            base = [x for x in runs if x["searcher"] == "ray" and x["repeat"] == r["repeat"]]
            if base:
                paired.append(r["trials_per_min"] / base[0]["trials_per_min"])
        lo, hi = spread(r["trials_per_min"] for r in mine)
        rows.append({
            "searcher": name, "repeats": len(mine), "trials": median(r["trials"] for r in mine),
            "errors": sum(r["errors"] for r in mine), "wall_s": median(r["wall_s"] for r in mine),
            "trials_per_min": median(r["trials_per_min"] for r in mine), "trials_per_min_min": lo,
            "trials_per_min_max": hi, "ratio_to_ray": median(r["trials_per_min"] for r in mine) / ref,
            "paired_ratios": [round(p, 3) for p in paired], "searcher_ms_per_trial": 1000 * costs.get(name, math.nan),
        })
    return rows


def write_markdown(path: Path, rows: list[dict[str, Any]], info: dict[str, Any], command: str,
                   load: dict[str, float], args: argparse.Namespace) -> None:
    table = [[r["searcher"], fmt(r["trials"], 0), r["errors"], fmt(r["wall_s"], 1),
              f"{fmt(r['trials_per_min'], 1)} ({fmt(r['trials_per_min_min'], 1)}-{fmt(r['trials_per_min_max'], 1)})",
              fmt(r["ratio_to_ray"], 2), ", ".join(f"{p:.2f}" for p in r["paired_ratios"]),
              fmt(r["searcher_ms_per_trial"], 2)] for r in rows]
    text = header_markdown("Scheduling overhead: trials per minute through each searcher", info, command, load)
    text += (
        f"\nA trivial trainable (one report, no work), {args.num_blocks} blocks, 1 CPU per trial on "
        f"`ray.init(num_cpus={args.num_cpus})`; {args.repeats} interleaved repeats; medians over repeats. "
        "*ratio*: trials/min over Ray's own BasicVariantGenerator (same number of trials); *per-repeat*: the "
        "same ratio against the Ray run of the same repeat. *searcher ms/trial*: suggest + on_trial_result + "
        "on_trial_complete in a plain loop without Ray (for `ray`: BasicVariantGenerator.next_trial).\n\n"
    )
    text += markdown_table(["searcher", "trials", "errors", "wall s", "trials/min (min-max)", "ratio to ray",
                            "per-repeat ratios", "searcher ms/trial"], table)
    text += "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16,
                        help="trials per experiment (FlexoraSearcher's count rounds to searches + 3*seeds; "
                             "the others then run exactly as many) (default 16)")
    parser.add_argument("--searches", type=int, default=4, help="FlexoraSearcher search trials (default 4)")
    parser.add_argument("--num-blocks", type=int, default=30, help="L, blocks of the emulated model (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--searchers", default=",".join(SEARCHERS), help=f"comma-separated subset of {SEARCHERS}")
    parser.add_argument("--num-cpus", type=int, default=2, help="ray.init(num_cpus=...) (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    parser.add_argument("--name", default="tune_overhead", help="result file stem (default tune_overhead)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.searchers.split(",") if n]
    unknown = sorted(set(names) - set(SEARCHERS))
    if unknown:
        raise SystemExit(f"unknown searchers {unknown}; choose from {SEARCHERS}")
    if "ray" not in names:
        names.insert(0, "ray")
    for key, value in (("RAY_AIR_NEW_OUTPUT", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                       ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")):
        os.environ.setdefault(key, value)
    import ray

    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    command, load = command_line(), LoadSampler()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    info = machine_info()
    # Flexora first, to learn its trial count; every other searcher then runs exactly as many trials.
    probe: Callable[[str], float] = lambda n: searcher_cost(n, args.trials, args.num_blocks, args.searches, 0)  # noqa: E731
    costs = {n: median(probe(n) for _ in range(3)) for n in names}
    trials = args.trials
    if "flexora" in names:
        searcher, _ = make_searcher("flexora", args.trials, args.num_blocks, args.searches, 0)
        trials = _count_flexora_trials(searcher, args.num_blocks)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flexora_tune_bench_") as storage:
        for rep, name in interleaved(names, args.repeats):
            load.sample()
            result = run_tune(name, trials, args.num_blocks, args.searches, random.Random(rep).randrange(1000),
                              storage)
            result["repeat"] = rep
            runs.append(result)
            print(f"[tune_overhead] repeat {rep} {name}: {result['trials']} trials in {result['wall_s']:.1f}s = "
                  f"{result['trials_per_min']:.1f}/min (errors {result['errors']}, load {os.getloadavg()[0]:.2f})",
                  flush=True)
    load.sample()
    ray.shutdown()
    rows = summarize(runs, costs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"{args.name}.csv", runs)
    write_json(args.out / f"{args.name}.json", {"command": command, "machine": info, "load_1min": load.summary(),
                                                 "trials": trials, "summary": rows, "runs": runs})
    write_markdown(args.out / f"{args.name}.md", rows, info, command, load.summary(), args)
    for r in rows:
        print(f"{r['searcher']:>8}: {r['trials_per_min']:.1f} trials/min, x{r['ratio_to_ray']:.2f} of Ray's own, "
              f"searcher {r['searcher_ms_per_trial']:.2f} ms/trial")
    print(f"[tune_overhead] wrote {args.out / args.name}.md/.csv/.json")
    return 0


def _count_flexora_trials(searcher: Any, num_blocks: int) -> int:
    """How many trials FlexoraSearcher makes with the trivial trainable's results (driven without Ray)."""
    searcher.set_search_properties(METRIC, MODE, {"num_blocks_total": num_blocks})
    count = 0
    while True:
        config = searcher.suggest(f"t{count}")
        if config is None or isinstance(config, str):
            return count
        result = trivial_result({"num_blocks_total": num_blocks, **config})
        searcher.on_trial_complete(f"t{count}", result)
        count += 1


if __name__ == "__main__":
    raise SystemExit(main())
