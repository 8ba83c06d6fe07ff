"""Per-trial fixed overhead of a layer-selection sweep, and short fine-tunes per minute, with and without reused
trial workers, through Ray Tune.

Arms (per model, the same trials in each): ``fresh`` — `reuse_actors=False`, every trial in a new worker process
that imports torch/transformers/peft, loads the model and reads the task; ``reuse`` — `reuse_actors=True`, so a
worker runs trial after trial and `load_model`/`load_task` serve its later trials from the per-process cache;
optionally ``reuse-nocache`` — reused workers with ``FLEXORA_MODEL_CACHE=0`` (what actor reuse alone buys).
Each trial is a real fine-tune through `flexora_tune.trainable`: `--steps` steps (10) on a block subset (4 blocks
of the upper half; 2 of the tiny model's 4), evaluated once at the end, one report with its checkpoint. Models:
the tests' tiny Llama (4 blocks, hidden 32) and the embedded default (SmolLM2-135M), the latter also as
``default-short``: batch 1 and `--short-eval` (8) validation and test examples, a trial of a few busy seconds,
where the overhead dominates (the speed-up from reuse depends on how long a trial computes; the result file
gives the break-even).

What is measured, per trial. *Busy*: the seconds the trial reports for training, validation and the test
evaluation (``compute_s + test_eval_s``). *Span*: from the moment its CPU slot became free (the experiment's
start, or the completion of the trial that held the slot; Tune starts a pending trial as soon as a slot frees)
to its own completion as the driver sees it. *Overhead* = span - busy: worker start, imports, model and task
load, LoRA attach, checkpoint, Tune's own result handling and scheduling. It is split into *before* (slot free
to the trial function's first line: scheduling and worker start for a new worker, the reset for a reused one),
*imports* (from there to the trainable's start: flexora_tune, torch, transformers, peft in a new worker),
*setup* (the trainable's start to its report, minus busy: task and model load, LoRA attach) and *after* (report
to completion: checkpoint upload, end of trial, Tune's bookkeeping). A trial is
*warm* when its worker ran a trial before. Trials per minute = trials / the arm's wall time (Tune's experiment
start-up and the first trials' cold starts included).

One `ray.init(num_cpus=--cpus)` in this process, 1 CPU per trial (torch uses 1 thread), shut down at the end;
arms run one after another in rotated order per `--repeats`.

    .venv/bin/python benchmarks/trial_overhead.py --models tiny                 # ~1 min on 2 cores
    .venv/bin/python benchmarks/trial_overhead.py                               # all three, ~7 min
    .venv/bin/python benchmarks/trial_overhead.py --from-json benchmarks/results/trial_overhead.json  # re-render

The trial function wraps `flexora_tune.trainable` and calls `release_trial_memory()` after it, as the trainable
itself should at the end of every trial.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import threading
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
    median,
    write_json,
)

MODES = ("fresh", "reuse", "reuse-nocache")
MODELS = ("tiny", "default", "default-short")
SUBSET_SIZE = 4


def timed_trainable(config: dict[str, Any]) -> None:
    """`flexora_tune.trainable`, plus a line in the benchmark's log: worker pid, when the trial's function started
    and returned (epoch seconds). ``_cache`` sets ``FLEXORA_MODEL_CACHE`` for the arm."""
    entered = time.time()
    config = dict(config)
    log, cache = config.pop("_log"), config.pop("_cache")
    os.environ["FLEXORA_MODEL_CACHE"] = cache
    from ray import tune

    from flexora_tune import trainable
    from flexora_tune.models import release_trial_memory

    imported = time.time()
    try:
        trainable(config)
    finally:
        release_trial_memory()
        with open(log, "a") as f:
            f.write(json.dumps({"trial_id": tune.get_context().get_trial_id(), "pid": os.getpid(),
                                "entered": entered, "imported": imported, "returned": time.time()}) + "\n")


def completion_times():
    """A Tune callback that notes when the driver saw each trial complete."""
    from ray.tune import Callback

    class Completions(Callback):
        def __init__(self) -> None:
            self.done: dict[str, float] = {}

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.done[trial.trial_id] = time.time()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.done[trial.trial_id] = time.time()

    return Completions()


def subsets(num_blocks: int, trials: int) -> list[list[int]]:
    """`trials` subsets (distinct while there are enough) of the upper half of the blocks (all blocks of a small
    model), 4 blocks each (half the pool if smaller), seeded: the same in every arm."""
    pool = list(range(num_blocks // 2, num_blocks)) if num_blocks >= 4 * SUBSET_SIZE else list(range(num_blocks))
    size = min(SUBSET_SIZE, max(1, len(pool) // 2))
    rng = random.Random(0)
    chosen: list[list[int]] = []
    while len(chosen) < trials:
        pick = sorted(rng.sample(pool, size))
        if pick not in chosen or len(chosen) >= math.comb(len(pool), size):
            chosen.append(pick)
    return chosen


def dir_bytes(path: str | None) -> int:
    if not path or not Path(path).exists():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_arm(model: dict[str, Any], mode: str, args: argparse.Namespace, storage: str) -> dict[str, Any]:
    """One Tune experiment of `args.trials` fine-tunes of `model` in `mode`; per-trial timings and results."""
    from ray import tune

    log = Path(storage) / f"{model['name']}_{mode}_{time.time_ns()}.jsonl"
    space = {
        "model": model["path"], "task": model["task"], "seed": 0, "max_steps": args.steps,
        "eval_every": args.steps, "batch_size": model["batch_size"], "eval_batch_size": 32, "lr": 1e-3,
        "blocks": tune.grid_search(subsets(model["num_blocks"], args.trials)),
        "_log": str(log), "_cache": "0" if mode == "reuse-nocache" else "1",
    }
    callback = completion_times()
    tuner = tune.Tuner(
        tune.with_resources(timed_trainable, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=mode != "fresh"),
        run_config=tune.RunConfig(name=log.stem, storage_path=storage, verbose=0, callbacks=[callback],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    started = time.time()
    grid = tuner.fit()
    wall = time.time() - started
    worker = {row["trial_id"]: row for row in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    trials = []
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = m.get("trial_id") or Path(result.path).name
        w = worker.get(trial_id, {})
        trials.append({
            "model": model["name"], "mode": mode, "trial_id": trial_id, "error": str(result.error or "")[:200],
            "blocks": m.get("blocks"), "val_accuracy": m.get("val_accuracy"), "test_accuracy": m.get("test_accuracy"),
            "val_loss": m.get("val_loss"), "train_loss": m.get("train_loss"),
            "busy_s": (m.get("compute_s") or math.nan) + (m.get("test_eval_s") or 0.0),
            "start_time": m.get("start_time"), "report_time": m.get("report_time"),
            "completed": callback.done.get(trial_id), "pid": w.get("pid"), "entered": w.get("entered"),
            "imported": w.get("imported"), "returned": w.get("returned"),
            "checkpoint_bytes": dir_bytes(result.checkpoint.path if result.checkpoint else None),
        })
    attribute_slots(trials, started, args.cpus)
    return {"model": model["name"], "mode": mode, "wall_s": wall, "trials": trials,
            "trials_per_min": 60.0 * len(trials) / wall}


def attribute_slots(trials: list[dict[str, Any]], started: float, slots: int) -> None:
    """Give each trial the moment its slot became free: slots free at `started` and at each completion; trials
    take them in the order their functions started (Tune fills a free slot with the next pending trial)."""
    ordered = sorted((t for t in trials if t["entered"]), key=lambda t: t["entered"])
    frees = sorted([started] * slots + [t["completed"] for t in trials if t["completed"]])
    seen: set[int] = set()
    for trial, free in zip(ordered, frees, strict=False):
        trial["warm"] = trial["pid"] in seen
        seen.add(trial["pid"])
        trial["slot_free"] = free
        trial["span_s"] = trial["completed"] - free
        trial["overhead_s"] = trial["span_s"] - trial["busy_s"]
        trial["before_s"] = trial["entered"] - free
        trial["imports_s"] = trial["start_time"] - trial["entered"]
        trial["setup_s"] = trial["report_time"] - trial["start_time"] - trial["busy_s"]
        trial["after_s"] = trial["completed"] - trial["report_time"]


def summarize(arms: list[dict[str, Any]], slots: int) -> list[dict[str, Any]]:
    """Per model and mode: median over repeats of trials/min; over all trials of overheads (all, cold, warm).
    *Steady* trials/min puts the arm's steady overhead (warm trials; all trials without reuse) on the model's
    median busy time over all its arms, so that load drift between arms does not enter the ratio."""
    rows = []
    for key in dict.fromkeys((a["model"], a["mode"]) for a in arms):
        mine = [a for a in arms if (a["model"], a["mode"]) == key]
        trials = [t for a in mine for t in a["trials"] if "overhead_s" in t]
        warm = [t for t in trials if t["warm"]]
        cold = [t for t in trials if not t["warm"]]
        busy = median(t["busy_s"] for t in trials)
        common = median(t["busy_s"] for a in arms if a["model"] == key[0] for t in a["trials"] if "busy_s" in t)
        steady = median(t["overhead_s"] for t in (warm or cold))
        rows.append({
            "model": key[0], "mode": key[1], "repeats": len(mine), "trials": len(trials),
            "errors": sum(1 for a in mine for t in a["trials"] if t["error"]),
            "workers": len({(id(a), t["pid"]) for a in mine for t in a["trials"]}),
            "wall_s": median(a["wall_s"] for a in mine), "trials_per_min": median(a["trials_per_min"] for a in mine),
            "busy_s": busy, "overhead_s": median(t["overhead_s"] for t in trials),
            "overhead_mean_s": sum(t["overhead_s"] for t in trials) / max(1, len(trials)),
            "cold_overhead_s": median(t["overhead_s"] for t in cold), "warm_overhead_s": median(
                t["overhead_s"] for t in warm), "n_warm": len(warm),
            "before_s": median(t["before_s"] for t in (warm or cold)),
            "imports_s": median(t["start_time"] - t["entered"] for t in (warm or cold)),
            "setup_s": median(t["setup_s"] for t in (warm or cold)),
            "after_s": median(t["after_s"] for t in (warm or cold)),
            "cold_before_s": median(t["before_s"] for t in cold), "cold_setup_s": median(t["setup_s"] for t in cold),
            "common_busy_s": common, "steady_trials_per_min": 60.0 * slots / (common + steady),
            "checkpoint_mb": median(t["checkpoint_bytes"] for t in trials) / 1e6,
        })
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["mode"] == "fresh"), None)
        row["speedup"] = row["trials_per_min"] / base["trials_per_min"] if base else math.nan
        row["steady_speedup"] = row["steady_trials_per_min"] / base["steady_trials_per_min"] if base else math.nan
    return rows


def same_numbers(arms: list[dict[str, Any]]) -> dict[str, bool]:
    """Per model: did every arm give each subset exactly the same val/test accuracy and losses?"""
    out = {}
    for model in dict.fromkeys(a["model"] for a in arms):
        seen: dict[str, tuple] = {}
        ok = True
        for arm in (a for a in arms if a["model"] == model):
            for t in arm["trials"]:
                values = (t["val_accuracy"], t["test_accuracy"], t["val_loss"], t["train_loss"])
                ok &= seen.setdefault(t["blocks"], values) == values and not t["error"]
        out[model] = ok
    return out


def model_label(name: str, args: argparse.Namespace) -> str:
    if name == "tiny":
        return "tiny Llama (4 blocks, hidden 32)"
    if name == "default-short":
        return f"SmolLM2-135M, short trial (batch 1, {args.short_eval}+{args.short_eval} eval examples)"
    return f"SmolLM2-135M (default; batch {args.batch_size})"


def prepare_models(names: list[str], args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    """The tiny model and CSV (built here, as the tests build them) and/or the embedded default."""
    from flexora_tune.models import load_config, resolve_model_path

    out = []
    for name in names:
        if name == "tiny":
            sys.path.insert(0, str(REPO / "tests"))
            import tiny

            path = tiny.save_model_dir(scratch / "tiny_llama", "llama")
            csv = tiny.write_csv(scratch / "keywords.csv", tiny.classification_rows(200))
            task = {"source": str(csv), "max_length": 32, "val_size": args.val_size, "test_size": args.test_size}
            out.append({"name": "tiny", "path": str(path), "task": task, "num_blocks": 4,
                        "batch_size": args.batch_size, "label": model_label(name, args)})
        else:
            resolve_model_path("default")  # converts the embedded GGUF once, outside the timed runs
            short = name == "default-short"
            evaluate = args.short_eval if short else None
            task = {"source": "default", "max_length": args.max_length, "val_size": evaluate or args.val_size,
                    "test_size": evaluate or args.test_size}
            out.append({"name": name, "path": "default", "task": task, "batch_size": 1 if short else args.batch_size,
                        "num_blocks": load_config("default").num_hidden_layers, "label": model_label(name, args)})
    return out


def write_markdown(path: Path, rows: list[dict[str, Any]], checks: dict[str, bool], models: list[dict[str, Any]],
                   args: argparse.Namespace, info: dict[str, Any], command: str, load: dict[str, float]) -> None:
    labels = {m["name"]: m["label"] for m in models}
    text = header_markdown("Per-trial overhead with and without reused trial workers", info, command, load)
    text += (
        "\nEach trial: a fine-tune of a block subset (4 of the upper half of the default's 30 blocks; 2 of the tiny "
        f"model's 4) for {args.steps} steps (batch {args.batch_size}; 1 in the short trials), one "
        f"evaluation at the end on {args.val_size} validation and {args.test_size} test examples "
        f"({args.short_eval} each in the short trials), one report with "
        f"its checkpoint, through `flexora_tune.trainable`; {args.trials} trials per arm, {args.cpus} CPU slots "
        f"(`ray.init(num_cpus={args.cpus})`, 1 CPU and 1 torch thread per trial), {args.repeats} repeat(s). "
        "Default model task: the built-in BBC task at max_length "
        f"{args.max_length}; tiny model: the tests' keyword CSV at max_length 32.\n\n"
        "*busy*: training + validation + test evaluation the trial reports. *overhead*: the trial's span (its CPU "
        "slot freed -> its completion) minus busy; *cold*: the first trial of a worker process, *warm*: later "
        "ones. *before*: slot free -> the trial function's first line (scheduling, worker start, or the actor "
        "reset); *imports*: from there to the trainable's start (importing flexora_tune, torch, transformers, peft "
        "in a new worker); *setup*: inside the trainable, outside busy (task and model load, LoRA attach); *after*: "
        "report -> completion (checkpoint, Tune's bookkeeping). *trials/min*: trials / the arm's wall time (cold "
        "starts included); *steady*: `60 x slots / (C + warm overhead)` (fresh arm: its overhead), a long sweep's "
        "rate once every worker is warm, with C the model's median busy time over both arms (the machine's load "
        "moved busy times between arms; the same C isolates the overhead).\n\n"
    )
    header = ["model", "arm", "trials", "workers", "wall s", "trials/min", "x fresh", "steady trials/min",
              "x fresh (steady)", "busy s", "overhead s (median)", "cold overhead s", "warm overhead s",
              "before s", "imports s", "setup s", "after s", "checkpoint MB"]
    table = [[labels[r["model"]], r["mode"], r["trials"], r["workers"], fmt(r["wall_s"], 1),
              fmt(r["trials_per_min"], 1), fmt(r["speedup"], 2), fmt(r["steady_trials_per_min"], 1),
              fmt(r["steady_speedup"], 2), fmt(r["busy_s"], 2), fmt(r["overhead_s"], 2),
              fmt(r["cold_overhead_s"], 2), fmt(r["warm_overhead_s"], 2), fmt(r["before_s"], 2),
              fmt(r["imports_s"], 2), fmt(r["setup_s"], 2), fmt(r["after_s"], 2), fmt(r["checkpoint_mb"], 2)]
             for r in rows]
    text += markdown_table(header, table) + "\n\n"
    text += "Before/imports/setup/after: medians over the warm trials (the cold ones in the fresh arm).\n\n"
    for model, ok in checks.items():
        text += (f"- {labels[model]}: every arm gave each subset "
                 f"{'exactly the same' if ok else 'DIFFERENT'} val/test accuracy and losses.\n")
    for r in rows:
        if r["mode"] == "reuse":
            fresh = next((x for x in rows if x["model"] == r["model"] and x["mode"] == "fresh"), None)
            text += (f"- {labels[r['model']]}: warm overhead {fmt(r['warm_overhead_s'], 2)} s per trial with reuse "
                     f"(fresh: {fmt(fresh['overhead_s'], 2) if fresh else '-'} s); trials/min x{fmt(r['speedup'], 2)}"
                     f" over fresh workers in this run (cold starts included), x{fmt(r['steady_speedup'], 2)} once "
                     f"warm at C = {r['common_busy_s']:.1f} s busy.\n")
            if fresh:
                o_f, o_r = fresh["overhead_s"], r["warm_overhead_s"]
                if o_f > 3 * o_r:
                    text += (f"  A trial of busy time C runs (C + {o_f:.1f}) / (C + {o_r:.2f}) times faster with "
                             f"reuse once warm: 3x or more for C <= {(o_f - 3 * o_r) / 2:.1f} s.\n")
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,default,default-short",
                        help=f"comma-separated: {', '.join(MODELS)} (default: all)")
    parser.add_argument("--short-eval", type=int, default=8,
                        help="validation and test examples of the default-short trials (default 8)")
    parser.add_argument("--modes", default="fresh,reuse", help=f"comma-separated arms: {', '.join(MODES)}")
    parser.add_argument("--trials", type=int, default=6, help="fine-tunes per arm (default 6)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per fine-tune (default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    parser.add_argument("--max-length", type=int, default=48, help="tokens per example, default model (48)")
    parser.add_argument("--val-size", type=int, default=32, help="validation examples (default 32)")
    parser.add_argument("--test-size", type=int, default=32, help="test examples (default 32)")
    parser.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=...); 1 CPU per trial (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all arms, in rotated order (default 1)")
    parser.add_argument("--name", default="trial_overhead", help="result file stem in benchmarks/results")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-summarize the arms stored in this result JSON and rewrite its .md (no new run)")
    args = parser.parse_args(argv)
    for value, valid in ((args.models, MODELS), (args.modes, MODES)):
        bad = sorted(set(value.split(",")) - set(valid))
        if bad:
            parser.error(f"unknown {bad}; choose from {valid}")
    return args


def rerender(path: Path) -> int:
    """Summarize the arms stored in a result JSON again and rewrite it and its Markdown (same command, machine
    and load as the run)."""
    data = json.loads(path.read_text())
    args = argparse.Namespace(**data["settings"])
    args.short_eval = getattr(args, "short_eval", 8)
    rows = summarize(data["arms"], args.cpus)
    checks = same_numbers(data["arms"])
    if "machine_read" not in data:  # runs before machine_read existed read the machine at their end
        data["machine"]["load_avg_1_5_15"] = f"{data['machine']['load_avg_1_5_15']} (read at the end of the run)"
        data["machine_read"] = "end"
    models = [{"name": n, "label": model_label(n, args)} for n in dict.fromkeys(a["model"] for a in data["arms"])]
    write_json(path, {**data, "summary": rows, "same_numbers": checks})
    write_markdown(path.with_suffix(".md"), rows, checks, models, args, data["machine"], data["command"],
                   data["load"])
    print(f"[trial_overhead] rewrote {path} and {path.with_suffix('.md')}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json)
    command = command_line()
    info = machine_info()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    load = LoadSampler()
    stop = threading.Event()

    def sample_load() -> None:
        while not stop.wait(5.0):
            load.sample()

    modes = args.modes.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="trial_overhead_"))
    models = prepare_models(args.models.split(","), args, scratch)
    load.sample()
    threading.Thread(target=sample_load, daemon=True).start()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")}})
    arms = []
    try:
        for rep in range(args.repeats):
            for model in models:
                shift = rep % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    arm = run_arm(model, mode, args, str(scratch / "ray"))
                    arm["repeat"] = rep
                    arms.append(arm)
                    print(f"[trial_overhead] {model['name']} {mode}: {len(arm['trials'])} trials in "
                          f"{arm['wall_s']:.1f}s = {arm['trials_per_min']:.1f}/min", flush=True)
    finally:
        ray.shutdown()
        stop.set()
    load.sample()
    rows = summarize(arms, args.cpus)
    checks = same_numbers(arms)
    summary_load = load.summary()
    write_json(RESULTS / f"{args.name}.json", {"command": command, "machine": info, "machine_read": "start",
                                                 "load": summary_load,
                                                 "settings": vars(args), "summary": rows, "same_numbers": checks,
                                                 "arms": arms})
    write_markdown(RESULTS / f"{args.name}.md", rows, checks, models, args, info, command, summary_load)
    for r in rows:
        print(f"{r['model']:>8} {r['mode']:>13}: {r['trials_per_min']:.1f} trials/min (x{r['speedup']:.2f}), "
              f"busy {r['busy_s']:.2f}s, overhead {r['overhead_s']:.2f}s (cold {r['cold_overhead_s']:.2f}, "
              f"warm {fmt(r['warm_overhead_s'])}), checkpoint {r['checkpoint_mb']:.2f} MB")
    print(f"[trial_overhead] same numbers in every arm: {checks}; wrote {RESULTS / args.name}.md/.json")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
