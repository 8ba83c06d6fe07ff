"""Run several layer-selection strategies on one model and task under the same budget, through Ray Tune, and
collect every trial into one DataFrame (and a results folder with tables and plots).

A comparison is one workload: every (strategy, seed) arm runs in one Tune experiment (``comparison``), its trials
multiplexed by `search.ArmsSearcher`, so all arms are in flight together and every slot of the cluster stays busy;
arms sized by Flexora's selection start as soon as that seed's search reports. Arms stay independent: each arm's
searcher sees only its own trials, and budgets are per arm.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import guards
from .blocks import BlockLayout
from .compare_rows import progress_callback, trial_rows
from .files import check_output_dir
from .floors import write_floors
from .models import load_model_layout
from .results import (
    EXPERIMENTS_FILE,
    META_FILE,
    TRAJECTORIES_FILE,
    TRIALS_FILE,
    VAL_ACCURACY,
    VAL_LOSS,
    check_metric_mode,
    infer_mode,
)

STRATEGIES = ("flexora", "random", "tpe", "all", "first-k", "last-k", "lora-norm", "grad-norm")
#: The one Tune experiment a comparison runs, under its storage path.
EXPERIMENT = "comparison"


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: every searching strategy gets, per seed, exactly `trials` fine-tunes (Flexora and the
    probes: their search or probe trial plus `trials`) and, when set, at most `budget` fine-tune equivalents of
    compute (FLOPs) and `budget_s` compute seconds, its own searches included. Static rules (all, first-k,
    last-k) need one fine-tune per seed. `k` sizes first-k, last-k, random, tpe and probe subsets; None takes
    the size Flexora chose for that seed (the paper's same-size comparison), or half the blocks when Flexora is
    not run."""

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
    searches: int = 1
    """Flexora searches per seed (seeds s, s + 1000, ...); with several, their consensus is fine-tuned first and
    the arm's compute counts every search."""
    budget: float | None = None
    """Compute per strategy and seed in fine-tune equivalents (the FLOPs of one all-blocks fine-tune of this
    comparison), searches and probes included; a trial whose report reaches its arm's budget is stopped, and the
    arm gets no new trial. None: no FLOPs budget."""
    budget_s: float | None = None
    """Compute seconds per strategy and seed, searches included (wall time: other load moves it); None: none."""
    k: int | None = None
    """Blocks of first-k, last-k, random, tpe and probe subsets; None: Flexora's count for that seed (else half)."""
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
    """Trials at once; None: every slot (cluster CPUs / `cpus_per_trial`, and GPUs / `gpus_per_trial` when
    trials ask for GPUs)."""
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
        for name in ("seeds", "trials", "searches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.budget_s is not None and not (isinstance(self.budget_s, int | float) and 0 < self.budget_s < math.inf):
            raise ValueError(f"budget_s must be a positive number of seconds, got {self.budget_s!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int | float)
                                        or not 0 < self.budget < math.inf):
            raise ValueError(f"budget must be a positive number of fine-tune equivalents, got {self.budget!r}")
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


def _slots(cfg: CompareConfig) -> int:
    """Trials the cluster can run at once: its CPUs / `cpus_per_trial` and, when trials ask for GPUs, its GPUs /
    `gpus_per_trial` (the smaller); at least 1. Read from ``ray.cluster_resources()`` after `_init_ray`."""
    import ray

    have = ray.cluster_resources()
    slots = [have.get("CPU", 0) / cfg.cpus_per_trial]
    if cfg.gpus_per_trial:
        slots.append(have.get("GPU", 0) / cfg.gpus_per_trial)
    return max(1, int(min(slots) + 1e-9))


def _tuner(cfg: CompareConfig, storage: str, base: dict, num_blocks: int, budget_flops: float | None):
    """A fresh `Tuner` for the whole comparison: one experiment whose `ArmsSearcher` runs every (strategy, seed)
    arm, each arm's searcher seeing only its own trials, with per-arm budgets stopped by `ArmBudgetStopper`."""
    from ray import tune

    from .search import ArmBudgetStopper, ArmsSearcher, comparison_arms

    arms = comparison_arms(cfg.strategies, cfg.seeds, cfg.trials, metric=cfg.metric, mode=cfg.mode,
                           num_blocks=num_blocks, k=cfg.k, searches=cfg.searches)
    searcher = ArmsSearcher(arms, cfg.metric, cfg.mode, budget_flops=budget_flops, budget_s=cfg.budget_s)
    planned, slots = searcher.planned_trials, cfg.max_concurrent or _slots(cfg)
    print(f"[compare] {EXPERIMENT}: {len(arms)} arms, {planned or 'up to the arms'} trials, {slots} at once",
          flush=True)
    budgeted = budget_flops is not None or cfg.budget_s is not None
    return tune.Tuner(
        _trainable(cfg),
        param_space=dict(base),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=planned or -1, max_concurrent_trials=slots,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage, stop=ArmBudgetStopper(searcher) if budgeted else None,
            verbose=0, callbacks=[progress_callback(planned, cfg.metric)],
            # 2, not 1: a driver killed between deleting the older checkpoint and saving the experiment state
            # would otherwise leave the state pointing at a checkpoint that is gone
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def _run(cfg: CompareConfig, path: str, tuner_args: tuple, finished: bool) -> tuple[Any, bool]:
    """Run (or, with `cfg.resume`, continue) the comparison's experiment at `path`: (its ResultGrid, whether a
    Ctrl-C ended it).

    On resume: a `finished` experiment is only read back (nothing re-runs); one with a saved state is restored
    with `Tuner.restore`, which brings back the multiplexing searcher (every arm's state, its spend), keeps
    finished trials, continues interrupted ones from their last checkpoint and retries errored ones; one that
    never saved a state starts fresh. Failing trials are retried from their last checkpoint up to
    `cfg.max_failures` times."""
    from ray import tune

    if cfg.resume and tune.Tuner.can_restore(path):
        if finished:
            print(f"[compare] {EXPERIMENT}: already finished; reading its results from {path}", flush=True)
            return tune.Tuner.restore(path, trainable=_trainable(cfg)).get_results(), False
        print(f"[compare] {EXPERIMENT}: resuming from {path}", flush=True)
        return _fit(tune.Tuner.restore(path, trainable=_trainable(cfg), resume_unfinished=True,
                                       resume_errored=True))
    if cfg.resume and finished:
        raise RuntimeError(f"cannot resume: {EXPERIMENT} finished earlier but its Tune state is gone from {path}; "
                           "rerun without --resume, or restore the storage path")
    return _fit(_tuner(cfg, *tuner_args))


def _saved_results(cfg: CompareConfig, path: str) -> Any:
    """The ResultGrid of the experiment state Tune last saved at `path`, or None (nothing saved, unreadable)."""
    from ray import tune

    try:
        if tune.Tuner.can_restore(path):
            return tune.Tuner.restore(path, trainable=_trainable(cfg)).get_results()
    except Exception:  # noqa: BLE001 - the caller is already failing; a failed rescue must not hide why
        pass
    return None


def _fit(tuner) -> tuple[Any, bool]:
    """`tuner.fit()` and whether a Ctrl-C ended it: Tune catches the first SIGINT, saves the experiment and
    returns normally; the caller writes what finished, then ends the comparison."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        grid = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is interrupt  # Tune's handler put ours back
    finally:
        signal.signal(signal.SIGINT, previous)
    return grid, interrupted


def _trainable(cfg: CompareConfig):
    from .tune_trainable import trainable_with_resources

    return trainable_with_resources({"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})


def _budget_flops(cfg: CompareConfig, model: str, base: Mapping[str, Any], num_blocks: int) -> float | None:
    """`cfg.budget` fine-tune equivalents in FLOPs: times one all-blocks fine-tune of this comparison (seed 0,
    its fine-tune settings), computed from the model's parameter counts and the planned batches, nothing run."""
    if cfg.budget is None:
        return None
    from .finetune import finetune_flops
    from .tune_trainable import parse_config

    settings = parse_config({**base, "stage": "finetune"}, num_blocks=num_blocks).settings
    unit = finetune_flops(model, base["task"], None, 0, **settings)
    print(f"[compare] budget: {cfg.budget:g} fine-tune equivalents = {cfg.budget * unit:.3g} FLOPs per strategy "
          "and seed", flush=True)
    return cfg.budget * unit


def _init_ray(cfg: CompareConfig) -> None:
    """Join `cfg.address` or start a local Ray; Tune's own tables and hints are silenced in favour of
    one progress line per trial. An address where nothing answers fails at once, and so does a trial that
    asks this machine's own Ray for more CPUs or GPUs than it has (it would wait forever)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not (cfg.storage_path and "://" in cfg.storage_path):
        # save the experiment state at every step (cheap on a local or NFS path): with Tune's default (every 10 s
        # or more) a killed driver can leave it naming a trial checkpoint that was deleted since (num_to_keep)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    import ray

    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    # search and probe reports carry -inf/+inf placeholders for fine-tune metrics on purpose (issue 14)
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

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

    Every (strategy, seed) arm runs in one Tune experiment (``comparison`` under the storage path), so all arms
    are in flight together and every slot stays busy. Settings, task, model, device, budgets and output folders
    are checked before Ray starts or anything is written. `out` stays locked for the run (a second comparison
    on it: `ResultsBusyError`); `resume` refuses a folder without an earlier comparison, or with another
    configuration (`ResumeError`, naming the keys). The trials are written when the experiment ends, and from
    what finished when a Ctrl-C or a failure ends it; when no fine-tune succeeded, `NoSuccessfulTrialError`
    follows them.
    """
    from .report import write_report, write_trials

    cfg = CompareConfig(**options)
    model, task = guards.absolute_model(cfg.model), guards.absolute_task(cfg.task)
    layout = load_model_layout(model, **guards.loader_options(cfg.settings))
    base = {"model": model, "task": dict(task) if isinstance(task, Mapping) else task, **dict(cfg.settings)}
    guards.check_trial_settings(base, layout.num_blocks, gpus_per_trial=cfg.gpus_per_trial, k=cfg.k)
    out = check_output_dir(out, "--out")
    storage = guards.storage_location(out, cfg.storage_path)
    if "://" not in storage:
        check_output_dir(storage, "--storage-path")
    meta = _meta(cfg, layout, model, task)
    if cfg.resume and out.is_dir():  # refuse before the lock file is created in a folder that is not a comparison's
        guards.check_resume(out, storage, [EXPERIMENT], meta, META_FILE, EXPERIMENTS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    with guards.results_lock(out):
        if cfg.resume:
            note = guards.check_resume(out, storage, [EXPERIMENT], meta, META_FILE, EXPERIMENTS_FILE)
            if note:
                print(f"[compare] {note}", flush=True)
        elif guards.read_compare_meta(out, META_FILE) is not None:
            print(f"[compare] {out} holds an earlier comparison; starting over (--resume continues one)", flush=True)
        budget_flops = _budget_flops(cfg, model, base, layout.num_blocks)
        _init_ray(cfg)
        done_file = out / EXPERIMENTS_FILE
        done = set(json.loads(done_file.read_text())) if cfg.resume and done_file.exists() else set()
        done_file.write_text(json.dumps(sorted(done)))
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        write_floors(out, model, task, cfg.settings, reuse=cfg.resume, **guards.loader_options(cfg.settings))
        started, path = time.time(), f"{storage}/{EXPERIMENT}"
        order = sorted(cfg.strategies, key=lambda s: s != "flexora")

        def keep(grid, finished_only: bool) -> list[dict[str, Any]]:
            rows, trajectories = trial_rows(grid, cfg.metric, finished_only=finished_only, order=order)
            write_trials(pd.DataFrame(rows), out)
            (out / TRAJECTORIES_FILE).write_text(json.dumps(trajectories))
            return rows

        try:
            grid, interrupted = _run(cfg, path, (storage, base, layout.num_blocks, budget_flops), EXPERIMENT in done)
        except BaseException:  # a Ctrl-C outside Tune's handler, a failing Tune: keep what Tune saved as finished
            saved = _saved_results(cfg, path)
            if saved is not None:
                keep(saved, finished_only=True)
            raise
        rows = keep(grid, finished_only=interrupted)
        if interrupted:
            raise KeyboardInterrupt
        # errored trials leave the comparison unfinished: --resume retries them
        done_file.write_text(json.dumps(sorted(done - {EXPERIMENT} if grid.num_errors else done | {EXPERIMENT})))
        print(f"[compare] {len(rows)} trials in {time.time() - started:.0f}s; writing the report to {out}", flush=True)
        write_report(out, metric=cfg.metric, mode=cfg.mode, reference=cfg.reference)
    guards.check_succeeded(rows, cfg.metric, out / TRIALS_FILE)
    return pd.DataFrame(rows)


def _meta(cfg: CompareConfig, layout: BlockLayout, model: str, task: str | Mapping[str, Any]) -> dict[str, Any]:
    """meta.json: what this comparison computes (a resume must match it) and the command that started it."""
    meta = {
        "model": model, "task": task, "metric": cfg.metric, "mode": cfg.mode,
        "strategies": list(cfg.strategies), "reference": cfg.reference,
        "seeds": cfg.seeds, "trials": cfg.trials, "budget": cfg.budget, "budget_s": cfg.budget_s,
        "num_blocks_total": layout.num_blocks, "target_modules": list(cfg.settings.get("target_modules")
                                                              or layout.target_modules),
        "layers_pattern": layout.pattern, "settings": dict(cfg.settings),
        "command": os.environ.get("FLEXORA_TUNE_COMMAND", ""),
    }
    if cfg.searches != 1:  # only then: a comparison saved before the option existed still resumes
        meta["searches"] = cfg.searches
    return json.loads(json.dumps(meta, default=str))
