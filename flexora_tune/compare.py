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

from .blocks import BlockLayout
from .models import load_model_layout
from .results import (
    EXPERIMENTS_FILE,
    FINETUNE_METRICS,
    META_FILE,
    TRAJECTORIES_FILE,
    VAL_ACCURACY,
    VAL_LOSS,
    check_metric_mode,
    infer_mode,
    read_selection,
)
from .tune_trainable import parse_config

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
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k}")
        if self.mode is None and isinstance(self.metric, str):
            object.__setattr__(self, "mode", infer_mode(self.metric))
        check_metric_mode(self.metric, self.mode)
        if self.metric not in (VAL_ACCURACY, VAL_LOSS):
            raise ValueError(f"metric {self.metric!r} is not a validation metric the trials report; choose "
                             f"{VAL_ACCURACY!r} (mode 'max') or {VAL_LOSS!r} (mode 'min')")
        if self.mode != infer_mode(self.metric):
            raise ValueError(f"mode {self.mode!r} would pick the worst trial by {self.metric!r}; use mode "
                             f"{infer_mode(self.metric)!r}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ValueError("cpus_per_trial must be > 0 and gpus_per_trial >= 0")
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
            "trainable_params": m.get("trainable_params"),
            **{key: m.get(key) for key in dict.fromkeys((*FINETUNE_METRICS, metric))},
            "compute_s": m.get("compute_s", 0.0), "node": m.get("node_ip", ""),
            "node_id": m.get("node_id", ""),
            "start_time": m.get("start_time"), "end_time": m.get("report_time"), "status": status,
            "steps": m.get("step"), "alpha": json.dumps(m["alpha"]) if stage == "search" and "alpha" in m else "",
            "error": str(result.error).splitlines()[0][:300] if result.error else "",
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
    one progress line per trial."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    logging.getLogger("ray.tune").setLevel(logging.WARNING)

    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def compare(out: str | Path = "results/compare", **options: Any) -> pd.DataFrame:
    """Run the comparison described by `CompareConfig(**options)`, write `out` (trials.csv, summary.csv,
    plots, best_selection.json, best_lora_config/) and return the trials DataFrame.

    Results are written after every experiment, so a later failure never loses finished trials.
    """
    from .report import write_report, write_trials

    cfg = CompareConfig(**options)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.storage_path and "://" in cfg.storage_path:  # s3://, gs://, ...: shared by every node of a cluster
        storage = cfg.storage_path.rstrip("/")
    else:
        storage = str(Path(cfg.storage_path).resolve() if cfg.storage_path else out / "ray")
    done_file = out / EXPERIMENTS_FILE
    done = set(json.loads(done_file.read_text())) if cfg.resume and done_file.exists() else set()
    if not cfg.resume:
        done_file.unlink(missing_ok=True)
    layout = load_model_layout(cfg.model)
    num_total = layout.num_blocks
    base = {"model": cfg.model, "task": dict(cfg.task) if isinstance(cfg.task, Mapping) else cfg.task,
            **dict(cfg.settings)}
    for stage in ("search", "finetune"):  # a bad setting fails here, not in every trial
        parse_config({**base, "stage": stage}, num_blocks=num_total)
    _write_meta(out, cfg, layout)
    _init_ray(cfg)
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
            done.add(experiment)
            done_file.write_text(json.dumps(sorted(done)))
    print(f"[compare] {len(rows)} trials in {time.time() - started:.0f}s; writing the report to {out}", flush=True)
    write_report(out, metric=cfg.metric)
    return pd.DataFrame(rows)


def _write_meta(out: Path, cfg: CompareConfig, layout: BlockLayout) -> None:
    meta = {
        "model": cfg.model, "task": cfg.task, "metric": cfg.metric, "mode": cfg.mode,
        "strategies": list(cfg.strategies), "seeds": cfg.seeds, "trials": cfg.trials, "budget_s": cfg.budget_s,
        "num_blocks_total": layout.num_blocks, "target_modules": list(cfg.settings.get("target_modules")
                                                              or layout.target_modules),
        "layers_pattern": layout.pattern, "settings": dict(cfg.settings),
        "command": os.environ.get("FLEXORA_TUNE_COMMAND", ""),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
