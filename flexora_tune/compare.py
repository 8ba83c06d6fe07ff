"""Run several layer-selection strategies on one model and task under the same budget, through Ray Tune,
and collect every trial into one DataFrame (and a results folder with tables and plots)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import guards
from .blocks import BlockLayout
from .files import check_output_dir
from .floors import write_floors
from .models import load_model_layout
from .results import (
    ALPHA_SEPARATION,
    EXPERIMENTS_FILE,
    FINETUNE_METRICS,
    FLOPS,
    META_FILE,
    SEARCH_METRICS,
    TRAJECTORIES_FILE,
    TRIALS_FILE,
    VAL_ACCURACY,
    VAL_LOSS,
    check_metric_mode,
    infer_mode,
    read_selection,
)

STRATEGIES = ("flexora", "random", "tpe", "all", "first-k", "last-k")


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: every strategy gets, per seed, at most `trials` fine-tunes and (when set) at most
    `budget_s` compute seconds, its own searches included. Static rules (all, first-k, last-k) need one
    fine-tune per seed. `k` sizes first-k, last-k and random subsets; None takes the size Flexora chose
    for that seed (the paper's same-size comparison), or half the blocks when Flexora is not run."""

    model: str = "default"
    """Model name, HF id or directory (see `models.load_model`)."""
    task: str | Mapping[str, Any] = "default"
    """Task name, file, HF dataset, or a dict of `TaskSpec` fields."""
    strategies: tuple[str, ...] = ("flexora", "random", "all", "last-k")
    """Strategies to compare, from `STRATEGIES`."""
    seeds: int = 1
    """Seeds per strategy (seed s of every strategy sees the same data order)."""
    trials: int = 3
    """Fine-tunes per strategy and seed (static rules need one)."""
    budget_s: float | None = None
    """Compute seconds per strategy and seed, searches included; None: no time budget."""
    k: int | None = None
    """Blocks of first-k, last-k and random subsets; None: Flexora's count for that seed (else half)."""
    metric: str = "val_accuracy"
    """Validation metric that ranks trials and picks the winner: ``val_accuracy`` or ``val_loss``."""
    mode: str | None = None
    """``max`` or ``min``; None: inferred from `metric` (min for losses)."""
    reference: str | None = None
    """The strategy every other one is compared with, seed by seed, in the paired verdicts; None: ``all``
    when it runs (else no paired verdicts)."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Trial settings shared by every strategy (fields of `FinetuneSettings`/`SearchSettings`, or the nested
    ``search``/``finetune`` dicts)."""
    address: str | None = None
    """An existing Ray cluster to join; None starts a local Ray."""
    storage_path: str | None = None
    """Tune storage (s3://, gs://, NFS; shared by every node); None: ``<out>/ray``."""
    cpus_per_trial: float = 1
    """CPUs Ray reserves per trial (torch's threads follow it)."""
    gpus_per_trial: float = 0
    """GPUs per trial; fractions pack several trials on one GPU."""
    max_concurrent: int | None = None
    """Trials at once per experiment; None: as many as resources allow."""
    resume: bool = False
    """Continue an interrupted comparison in the same results folder."""
    max_failures: int = 1
    """Retries per trial after a failure, each from its last checkpoint; -1 retries forever."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown or not self.strategies:
            raise ValueError(f"unknown strategies {unknown or '(none given)'}; choose from {', '.join(STRATEGIES)}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies listed twice: {list(self.strategies)}")
        for name in ("seeds", "trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.budget_s is not None and not (isinstance(self.budget_s, int | float) and 0 < self.budget_s < math.inf):
            raise ValueError(f"budget_s must be a positive number of seconds, got {self.budget_s!r}")
        for name in ("k", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.mode is None and isinstance(self.metric, str):
            object.__setattr__(self, "mode", infer_mode(self.metric))
        check_metric_mode(self.metric, self.mode)
        if self.reference is None and "all" in self.strategies:
            object.__setattr__(self, "reference", "all")
        if self.reference is not None and self.reference not in self.strategies:
            raise ValueError(f"reference {self.reference!r} is not among the strategies {list(self.strategies)}; "
                             "add it to the strategies or choose one of them as the reference")
        if self.metric not in (VAL_ACCURACY, VAL_LOSS):
            raise ValueError(f"metric {self.metric!r} is not a validation metric the trials report; choose "
                             f"{VAL_ACCURACY!r} (mode 'max') or {VAL_LOSS!r} (mode 'min')")
        if self.mode != infer_mode(self.metric):
            raise ValueError(f"mode {self.mode!r} would pick the worst trial by {self.metric!r}; use mode "
                             f"{infer_mode(self.metric)!r}")
        if not (0 < self.cpus_per_trial < math.inf and 0 <= self.gpus_per_trial < math.inf):
            raise ValueError(f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {self.cpus_per_trial!r} and "
                             f"{self.gpus_per_trial!r}")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"max_failures must be an int >= 0 (or -1: retry forever), got {self.max_failures!r}")


def _compute_stopper(budget_s: float):
    """A Tune stopper that ends the experiment once its trials' compute seconds add up to `budget_s`."""
    from ray.tune.stopper import Stopper

    class ComputeBudget(Stopper):
        def __init__(self) -> None:
            self.spent: dict[str, float] = {}

        def __call__(self, trial_id: str, result: dict) -> bool:
            value = result.get("compute_s")
            if isinstance(value, int | float) and math.isfinite(value):
                self.spent[trial_id] = float(value)
            return False

        def stop_all(self) -> bool:
            return sum(self.spent.values()) >= budget_s

    return ComputeBudget()


def _progress_callback(label: str, planned: int, metric: str):
    """One line per finished trial, so a long comparison shows where it is."""
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
            print(f"[compare] {label}: trial {self.done}/{planned} {status} {r.get('stage', '')} "
                  f"blocks [{r.get('blocks', '')}] {shown} compute {r.get('compute_s', 0):.0f}s", flush=True)

    return Progress()


def _searcher(name: str, cfg: CompareConfig, seed: int, k: int | None):
    """The Tune searcher for one strategy and seed, and the number of trials it may run."""
    from .search import FlexoraSearcher, RandomLayerSearcher, StaticLayerSearcher, tpe_searcher

    metric, mode = cfg.metric, cfg.mode
    if name == "flexora":
        searcher = FlexoraSearcher(metric, mode, search_seeds=[seed], finetune_seeds=[seed],
                                   neighbours=(cfg.trials - 1) // 2)
        return searcher, searcher.planned_trials
    if name == "random":
        return RandomLayerSearcher(metric, mode, k=k, seed=seed, trial_seed=seed), cfg.trials
    if name == "tpe":
        return tpe_searcher(metric, mode, seed=seed, trial_seed=seed), cfg.trials
    rule = {"all": "all", "first-k": "first", "last-k": "last"}[name]
    return StaticLayerSearcher(metric, mode, rule=rule, k=k if rule != "all" else None, seeds=[seed]), 1


def _trial_rows(grid, strategy: str, seed: int, metric: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per trial of a finished experiment, and the search trials' gate trajectories."""
    rows, trajectories = [], {}
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = m.get("trial_id") or Path(result.path).name
        config = result.config or {}
        status = "ERROR" if result.error else ("TERMINATED" if m.get("final", True) else "EARLY_STOPPED")
        stage = m.get("stage") or config.get("stage", "finetune")
        rows.append({
            "trial_id": trial_id, "strategy": strategy, "seed": seed, "stage": stage,
            "variant": m.get("variant") or config.get("variant", ""), "blocks": m.get("blocks", ""),
            "num_blocks": m.get("num_blocks"), "num_blocks_total": m.get("num_blocks_total"),
            "trainable_params": m.get("trainable_params"), FLOPS: m.get(FLOPS),
            ALPHA_SEPARATION: m.get(ALPHA_SEPARATION),
            **{key: m.get(key) if stage != "search" else None for key in dict.fromkeys((*FINETUNE_METRICS, metric))},
            **{key: m.get(key) for key in SEARCH_METRICS},
            "compute_s": m.get("compute_s", 0.0), "node": m.get("node_ip", ""),
            "node_id": m.get("node_id", ""),
            "start_time": m.get("start_time"), "end_time": m.get("report_time"), "status": status,
            "steps": m.get("step"), "alpha": json.dumps(m["alpha"]) if stage == "search" and "alpha" in m else "",
            "error": guards.error_line(result.error),
        })
        data = read_selection(result.checkpoint) if stage == "search" else None
        if data is not None:
            trajectories[trial_id] = {"strategy": strategy, "seed": seed, "steps": data.get("trajectory_steps", []),
                                      "alpha": data.get("alpha_trajectory", [])}
    return rows, trajectories


def _run_experiment(name: str, cfg: CompareConfig, seed: int, k: int | None, storage: str, base: dict,
                    finished: bool = False):
    """Run (or, with `cfg.resume`, continue) the Tune experiment `{name}_seed{seed}` and return its ResultGrid.

    On resume: a `finished` experiment is only read back (nothing re-runs); one with a saved experiment
    state is restored with `Tuner.restore`, which brings back its searcher's state, keeps finished trials and
    continues interrupted ones from their last checkpoint; one that never saved a state starts fresh.
    Trials that fail (e.g. their node died) are retried from their last checkpoint up to `cfg.max_failures`
    times.
    """
    from ray import tune

    experiment = f"{name}_seed{seed}"
    trainable = tune.with_resources(
        _trainable(), {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    )
    path = f"{storage}/{experiment}"
    if cfg.resume and tune.Tuner.can_restore(path):
        if finished:
            print(f"[compare] {experiment}: already finished; reading its results from {path}", flush=True)
            return tune.Tuner.restore(path, trainable=trainable).get_results()
        print(f"[compare] {experiment}: resuming from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        return _fit(tuner)
    if cfg.resume and finished:
        raise RuntimeError(f"cannot resume: {experiment} finished earlier but its Tune state is gone from {path}; "
                           "rerun without --resume, or restore the storage path")
    searcher, planned = _searcher(name, cfg, seed, k)
    print(f"[compare] {experiment}: up to {planned} trial(s)", flush=True)
    stopper = _compute_stopper(cfg.budget_s) if cfg.budget_s else None
    tuner = tune.Tuner(
        trainable,
        param_space=dict(base),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=planned,
                                    max_concurrent_trials=cfg.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=experiment, storage_path=storage, stop=stopper, verbose=0,
            callbacks=[_progress_callback(experiment, planned, cfg.metric)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    return _fit(tuner)


def _fit(tuner):
    """`tuner.fit()`, but a Ctrl-C ends the whole comparison: Tune catches the first SIGINT, saves the
    experiment and returns normally, which would otherwise start the next experiment."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        grid = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is interrupt  # Tune's handler put ours back
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return grid


def _trainable():
    from .tune_trainable import trainable

    return trainable


def _auto_k(rows: Sequence[Mapping[str, Any]], seed: int, fallback: int) -> int:
    sizes = [r["num_blocks"] for r in rows
             if r["strategy"] == "flexora" and r["seed"] == seed and r["stage"] == "search" and r["num_blocks"]]
    return int(sizes[0]) if sizes else fallback


def _init_ray(cfg: CompareConfig) -> None:
    """Join `cfg.address` or start a local Ray; Tune's own tables and hints are silenced in favour of
    one progress line per trial. An address where nothing answers fails at once, and so does a trial that
    asks this machine's own Ray for more CPUs or GPUs than it has (it would wait forever)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    logging.getLogger("ray.tune").setLevel(logging.WARNING)

    if not ray.is_initialized():
        if cfg.address:
            guards.join_ray_cluster(cfg.address)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    if not cfg.address:
        guards.check_local_resources(cfg.cpus_per_trial, cfg.gpus_per_trial)


def compare(out: str | Path = "results/compare", **options: Any) -> pd.DataFrame:
    """Run the comparison described by `CompareConfig(**options)`, write `out` (trials.csv, summary.csv,
    floors.json, plots, best_selection.json, best_lora_config/) and return the trials DataFrame.

    Settings, task, model, device and output folders are checked before Ray starts or anything is written.
    `out` stays locked for the run (a second comparison on it: `ResultsBusyError`); `resume` refuses a folder
    without an earlier comparison, or with another configuration (`ResumeError`, naming the keys). Results
    are written after every experiment; when no fine-tune succeeded, `NoSuccessfulTrialError` follows them.
    """
    from .report import write_report, write_trials

    cfg = CompareConfig(**options)
    model, task = guards.absolute_model(cfg.model), guards.absolute_task(cfg.task)
    layout = load_model_layout(model, **guards.loader_options(cfg.settings))
    num_total = layout.num_blocks
    base = {"model": model, "task": dict(task) if isinstance(task, Mapping) else task, **dict(cfg.settings)}
    guards.check_trial_settings(base, layout.num_blocks, gpus_per_trial=cfg.gpus_per_trial, k=cfg.k)
    out = check_output_dir(out, "--out")
    storage = guards.storage_location(out, cfg.storage_path)
    if "://" not in storage:
        check_output_dir(storage, "--storage-path")
    experiments = [f"{name}_seed{seed}" for seed in range(cfg.seeds) for name in cfg.strategies]
    meta = _meta(cfg, layout, model, task)
    if cfg.resume and out.is_dir():  # refuse before the lock file is created in a folder that is not a comparison's
        guards.check_resume(out, storage, experiments, meta, META_FILE, EXPERIMENTS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    with guards.results_lock(out):
        if cfg.resume:
            note = guards.check_resume(out, storage, experiments, meta, META_FILE, EXPERIMENTS_FILE)
            if note:
                print(f"[compare] {note}", flush=True)
        elif guards.read_compare_meta(out, META_FILE) is not None:
            print(f"[compare] {out} holds an earlier comparison; starting over (--resume continues one)", flush=True)
        _init_ray(cfg)
        done_file = out / EXPERIMENTS_FILE
        done = set(json.loads(done_file.read_text())) if cfg.resume and done_file.exists() else set()
        if not cfg.resume:
            done_file.unlink(missing_ok=True)
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        write_floors(out, model, task, cfg.settings, reuse=cfg.resume, **guards.loader_options(cfg.settings))
        rows: list[dict[str, Any]] = []
        trajectories: dict[str, Any] = {}
        started = time.time()
        order = sorted(cfg.strategies, key=lambda s: s != "flexora")
        for seed in range(cfg.seeds):
            for name in order:
                k = cfg.k or (_auto_k(rows, seed, max(1, num_total // 2)) if name != "tpe" else None)
                experiment = f"{name}_seed{seed}"
                grid = _run_experiment(name, cfg, seed, k if name in ("random", "first-k", "last-k") else None,
                                       storage, base, finished=experiment in done)
                new_rows, new_traj = _trial_rows(grid, name, seed, cfg.metric)
                rows.extend(new_rows)
                trajectories.update(new_traj)
                write_trials(pd.DataFrame(rows), out)
                (out / TRAJECTORIES_FILE).write_text(json.dumps(trajectories))
                if not grid.num_errors:  # an experiment with errored trials is not finished: --resume retries them
                    done.add(experiment)
                done_file.write_text(json.dumps(sorted(done)))
        print(f"[compare] {len(rows)} trials in {time.time() - started:.0f}s; writing the report to {out}", flush=True)
        write_report(out, metric=cfg.metric, mode=cfg.mode, reference=cfg.reference)
    guards.check_succeeded(rows, cfg.metric, out / TRIALS_FILE)
    return pd.DataFrame(rows)


def _meta(cfg: CompareConfig, layout: BlockLayout, model: str, task: str | Mapping[str, Any]) -> dict[str, Any]:
    """meta.json: what this comparison computes (a resume must match it) and the command that started it."""
    meta = {
        "model": model, "task": task, "metric": cfg.metric, "mode": cfg.mode,
        "strategies": list(cfg.strategies), "reference": cfg.reference,
        "seeds": cfg.seeds, "trials": cfg.trials, "budget_s": cfg.budget_s,
        "num_blocks_total": layout.num_blocks, "target_modules": list(cfg.settings.get("target_modules")
                                                              or layout.target_modules),
        "layers_pattern": layout.pattern, "settings": dict(cfg.settings),
        "command": os.environ.get("FLEXORA_TUNE_COMMAND", ""),
    }
    return json.loads(json.dumps(meta, default=str))
