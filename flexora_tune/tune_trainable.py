"""The one Ray Tune function trainable: a Flexora search trial, a probe trial (a cheap ranking of the blocks) or a
fine-tune of one block subset."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .blocks import BlockSelection, format_blocks
from .finetune import FinetuneSettings, planned_steps, settings_from
from .model_cache import release_trial_memory
from .results import (
    ALPHA_SEPARATION,
    ARM,
    FINETUNE_METRICS,
    FINETUNE_STEP,
    PROBE_FILE,
    PROBE_KEY,
    PROBE_RANKING,
    PROBE_SCORES,
    PROBE_STAGE,
    SEARCH_TRAIN_LOSS,
    SEARCH_VAL_LOSS,
    SELECTION_FILE,
    TRAIN_LOSS,
    best_search_selection,
    infer_mode,
    trial_outcomes,
)
from .search.encoding import BLOCKS_KEY, LAYERS_KEY, num_blocks_of, selection_from_config
from .tasks import TaskData, load_task

Stage = Literal["search", "finetune", "probe"]
IDENTITY_KEYS = ("model", "task", "seed", "stage", "strategy", "variant", PROBE_KEY, ARM)
SUBSET_KEYS = (LAYERS_KEY, BLOCKS_KEY)
STAGE_OVERRIDE_KEYS = ("search", "finetune")
#: What a search report holds under each fine-tune metric: the worst value of its kind, never a measurement.
SEARCH_PLACEHOLDERS: dict[str, float] = {
    key: math.inf if infer_mode(key) == "min" else -math.inf for key in FINETUNE_METRICS
}
_CURVES = ("trajectory_steps", "alpha_trajectory", "val_loss_curve", "train_loss_curve")


def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def _search_settings_fields() -> frozenset[str]:
    from .flexora import SearchSettings

    return _field_names(SearchSettings)


def _probe_settings_fields() -> frozenset[str]:
    from .probes import ProbeSettings

    return _field_names(ProbeSettings)


@dataclass(frozen=True)
class TrialConfig:
    """A trial config, validated: which stage runs, on what, and with which stage settings.

    `settings` holds only the keys of the running stage's settings class; keys meant for the other stage
    (e.g. ``epochs`` in a search trial) are dropped, so one base config serves both stages. The nested
    dicts ``config["search"]`` / ``config["finetune"]`` override settings for one stage only. A search
    trial keeps the fine-tune's settings in `finetune_settings`, to size itself against that fine-tune. A probe
    trial (stage ``"probe"``, `probe` one of `probes.PROBES`) takes the search's settings (``config["search"]``
    included, so it trains on the search set for as many steps as the search beside it) and `ProbeSettings`'
    own, and sizes itself the same way.
    """

    model: str = "default"
    task: str | Mapping[str, Any] = "default"
    seed: int = 0
    stage: Stage = "finetune"
    strategy: str | None = None
    variant: str = ""
    probe: str | None = None
    selection: BlockSelection | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    finetune_settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The strategy name reported with every result."""
        if self.strategy:
            return self.strategy
        if self.stage == PROBE_STAGE:
            return str(self.probe)
        return "flexora" if self.stage == "search" else ("all" if self.selection is None else "given")


def parse_config(config: Mapping[str, Any], num_blocks: int | None = None) -> TrialConfig:
    """Validate a Tune config and split it into identity, subset and stage settings.

    Raises a `ValueError`/`TypeError` naming any key no stage knows. `num_blocks` (the model's L) is read
    from the model config when a ``blocks`` list needs it and it is not given.
    """
    config = dict(config)
    stage = config.get("stage", "finetune")
    if stage not in ("search", "finetune", PROBE_STAGE):
        raise ValueError(f"config['stage'] must be {PROBE_STAGE!r}, 'search' or 'finetune', got {stage!r}")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"config['seed'] must be an int, got {seed!r}")
    finetune_keys = _field_names(FinetuneSettings)
    try:
        search_keys = _search_settings_fields()
    except ImportError:  # the Flexora search is optional for fine-tune-only sweeps
        search_keys = frozenset()
    try:
        probe_keys = _probe_settings_fields()
    except ImportError:
        probe_keys = search_keys
    own = {"search": search_keys, "finetune": finetune_keys, PROBE_STAGE: probe_keys}[stage]
    other = (finetune_keys | search_keys | probe_keys) - own
    for name, valid in (("search", search_keys), ("finetune", finetune_keys)):
        overrides = config.get(name) or {}
        if not isinstance(overrides, Mapping):
            raise TypeError(f"config[{name!r}] must be a dict of {name} settings: {type(overrides).__name__}")
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"unknown {name} setting(s) {bad} in config[{name!r}]; valid: {sorted(valid)}")

    def stage_settings(name: str, keys: frozenset[str]) -> dict[str, Any]:
        return {**{k: v for k, v in config.items() if k in keys}, **(config.get(name) or {})}

    settings = stage_settings("search" if stage == PROBE_STAGE else stage, own)
    finetune_settings = stage_settings("finetune", finetune_keys) if stage != "finetune" else {}
    reserved = {*IDENTITY_KEYS, *SUBSET_KEYS, *STAGE_OVERRIDE_KEYS}
    unknown = sorted(k for k in config if k not in reserved and k not in own and k not in other)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown}: the trainable takes {sorted(reserved)}, fine-tune settings "
            f"{sorted(finetune_keys)} and search settings {sorted(search_keys)}"
        )
    selection = None
    if stage == "finetune":
        needs_l = num_blocks is None and config.get(BLOCKS_KEY) is not None
        total = (num_blocks_of(config.get("model", "default"), bool(config.get("trust_remote_code")))
                 if needs_l else num_blocks)
        selection = selection_from_config(config, total)
    elif any(config.get(k) is not None for k in SUBSET_KEYS):
        raise ValueError(f"a {stage} trial (stage {stage!r}) chooses its own blocks: drop 'layers'/'blocks'")
    probe = config.get(PROBE_KEY)
    if stage == PROBE_STAGE:
        from .probes import PROBES

        if probe not in PROBES:
            raise ValueError(f"a probe trial needs config[{PROBE_KEY!r}] in {PROBES}, got {probe!r}")
    strategy = config.get("strategy")
    return TrialConfig(
        model=config.get("model", "default"), task=config.get("task", "default"), seed=seed, stage=stage,
        strategy=str(strategy) if strategy else None, variant=str(config.get("variant") or ""),
        probe=str(probe) if stage == PROBE_STAGE else None, selection=selection, settings=settings,
        finetune_settings=finetune_settings,
    )


def ray_runtime_settings(requested_device: str | None = None) -> dict[str, Any]:
    """torch threads = the CPUs Ray assigned this trial (oversubscribed threads make each step several times
    slower); device ``cuda`` when Ray assigned a GPU (whole or fractional), ``cpu`` when it assigned none.
    A trial given a GPU that CUDA cannot use here fails at once with `TrialDeviceError` (which case, and the
    fix) instead of training on the CPU; `requested_device` (the trial's ``device`` setting) ``"cpu"`` opts out."""
    import ray

    from .devices import trial_device

    assigned = ray.get_runtime_context().get_assigned_resources()
    settings: dict[str, Any] = {"threads": max(1, int(assigned.get("CPU", 1) or 1))}
    # what this trial was assigned: a reused worker process can still list GPUs of an earlier task it ran
    gpu_ids = ray.get_gpu_ids() if assigned.get("GPU") else []
    settings["device"] = trial_device(gpu_ids, requested=requested_device)
    return settings


def _report(metrics: dict[str, Any], save_state=None) -> None:
    from ray import tune

    metrics = {**metrics, "report_time": time.time()}
    if save_state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="flexora_ckpt_") as directory:
        save_state(directory)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


@contextlib.contextmanager
def _resume_dir():
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        yield None
    else:
        with checkpoint.as_directory() as directory:
            yield directory


def trainable(config: dict[str, Any]) -> None:
    """Run one trial: a Flexora search (``stage="search"``), a probe (``stage="probe"``, ``probe="lora-norm"`` or
    ``"grad-norm"``, optional ``top_k``: `probes.py`) or a LoRA fine-tune of one block subset.

    Config keys: ``model`` and ``task`` (names, paths, or a dict of `TaskSpec` fields), ``seed`` (0),
    ``stage`` (``"finetune"``), ``strategy``/``variant``/``arm`` (labels echoed in results), the subset as
    ``layers`` = {"l00": 0/1, ...} or ``blocks`` = [i, ...] (fine-tune only; none means all blocks), any
    `FinetuneSettings` or `SearchSettings` field (each stage keeps its own and ignores the other's), and the
    nested dicts ``search``/``finetune`` for settings of one stage only. Unknown keys fail the trial.
    Defaults are the method's reference (fine-tune: 3 epochs, lr 1e-4, r 8; search: the reference's share
    of the fine-tune given by the same config, see `default_search_steps`); tiny test runs set e.g.
    ``max_steps``/``eval_every`` and ``steps``/``report_every``.
    torch threads default to the CPUs Ray assigned the trial, the device to CUDA when it was given a GPU.

    Reported after every epoch / ``eval_every`` steps (fine-tune) or every ``report_every`` steps (search),
    each report with a resumable `ray.tune.Checkpoint`:

    - ``val_accuracy``, ``val_loss``, ``test_accuracy``, ``train_loss``: the fine-tune's metrics. Search
      reports hold them only as placeholders, -inf (+inf for a loss): the worst value, never a measurement.
      They are there because Tune's strict metric check wants the experiment's metric in every report, and
      are not NaN so that ``ResultGrid.get_dataframe(filter_metric=...)`` works under pandas 3 (its row for
      a search trial is then the search's first report);
    - ``finetune_step`` (`FINETUNE_STEP`): the time attribute to give schedulers, e.g.
      ``ASHAScheduler(time_attr="finetune_step", max_t=<fine-tune steps>)``: a fine-tune's optimizer step,
      and 0 in every search report, so ASHA, MedianStoppingRule and HyperBand never place a search at a rung
      or compare one, and never stop a fine-tune because of one. PBT refuses any searcher (Ray raises at
      start). A search that a scheduler on another time attribute cuts short contributes no selection;
    - ``num_blocks``, ``num_blocks_total``, ``blocks`` (``"0,3,7"``), ``trainable_params``;
    - ``compute_s``: cumulative compute seconds of this trial (excluding Ray overhead, across resumes);
    - ``step``, ``total_steps``, ``progress`` (step / total_steps) and ``final`` (True on the last report of
      a trial that ran to its end, False in reports an early stop cuts short);
    - ``stage``, ``strategy``, ``variant``, ``seed``, ``device``, ``threads``, ``node_id`` (what and where the
      trial ran), and
      ``start_time``/``report_time`` (epoch seconds: when the trial started, when this was reported);
    - search trials also: their own losses ``search_val_loss`` and ``search_train_loss`` (means since the
      previous report), ``alpha`` (list, one per block), and in the final report
      ``selection`` (the `SelectionResult` as JSON, without its curves; the full one is ``selection.json``
      in that report's checkpoint), plus the search's ``gates``, ``threshold`` and ``stable_steps``;
    - probe trials report as search trials do (placeholders, ``finetune_step`` 0, ``flops``, ``compute_s``), plus
      ``probe``, ``search_train_loss`` (progress every ``report_every`` steps of lora-norm's training), and in the
      final report the kept ``blocks``, ``probe_scores`` (one per block), ``probe_ranking`` (best first),
      ``threshold`` and ``search_val_loss`` (lora-norm); the `ProbeResult` is ``probe.json`` in its checkpoint.

    Every report checkpoints; keep storage bounded with ``RunConfig(checkpoint_config=CheckpointConfig(
    num_to_keep=2))``. A restarted trial resumes from `tune.get_checkpoint()`.
    """
    import ray

    trial = parse_config(config)
    runtime = ray_runtime_settings(trial.settings.get("device"))
    settings = {**runtime, **trial.settings}
    identity = {"stage": trial.stage, "strategy": trial.label, "variant": trial.variant, "seed": trial.seed,
                "device": str(settings["device"]), "threads": settings["threads"], "start_time": time.time(),
                "node_id": ray.get_runtime_context().get_node_id(), ARM: str(config.get(ARM) or "")}
    try:
        if trial.stage == "search":
            _run_search(trial, settings, identity)
        elif trial.stage == PROBE_STAGE:
            _run_probe(trial, settings, {**identity, PROBE_KEY: trial.probe})
        else:
            _run_finetune(trial, settings, identity)
    finally:
        release_trial_memory()


def trainable_with_resources(resources: dict[str, float]):
    """`trainable` with Ray resources per trial (e.g. ``{"cpu": 2, "gpu": 0.5}``), as a new function: Ray's
    `tune.with_resources` sets an attribute on the function it is given, so applying it to `trainable` itself
    would hand the same resources to every later ``tune.run(trainable)`` in the process."""
    from ray import tune

    @functools.wraps(trainable)
    def with_resources(config: dict[str, Any]) -> None:
        trainable(config)

    return tune.with_resources(with_resources, resources)


def _run_finetune(trial: TrialConfig, settings: dict[str, Any], identity: dict[str, Any]) -> None:
    from .finetune import finetune

    checked = settings_from(FinetuneSettings, settings)
    data: TaskData = load_task(trial.task)
    total = planned_steps(len(data.train), checked)

    def on_eval(metrics: dict[str, Any], save_state) -> None:
        blocks = trial.selection.blocks if trial.selection else tuple(range(num_total))
        _report({**metrics, **identity, FINETUNE_STEP: metrics["step"], "blocks": format_blocks(blocks),
                 "num_blocks_total": num_total, "total_steps": total, "progress": metrics["step"] / total,
                 "final": metrics["step"] >= total}, save_state)

    num_total = (trial.selection.num_blocks_total if trial.selection
                 else num_blocks_of(trial.model, bool(settings.get("trust_remote_code"))))
    with _resume_dir() as resume_from:
        finetune(trial.model, data, trial.selection, trial.seed, on_eval=on_eval, resume_from=resume_from,
                 **settings)


def _run_search(trial: TrialConfig, settings: dict[str, Any], identity: dict[str, Any]) -> None:
    from .flexora import SelectionResult, search_layers

    unset = {**SEARCH_PLACEHOLDERS, FINETUNE_STEP: 0}

    def on_step(metrics: dict[str, Any], save_state) -> None:
        blocks = list(metrics.get("blocks") or [])
        total = metrics.get("total_steps")
        own = {SEARCH_TRAIN_LOSS if k == TRAIN_LOSS else k: v for k, v in metrics.items()
               if k not in ("blocks", "alpha")}
        row = {**own, **unset, **identity, "blocks": format_blocks(blocks), "num_blocks": len(blocks),
               "alpha": [float(a) for a in metrics.get("alpha") or []], "final": False}
        if total:
            row["progress"] = metrics["step"] / total
        _report(row, save_state)

    with _resume_dir() as resume_from:
        finished = Path(resume_from) / SELECTION_FILE if resume_from else None
        if finished is not None and finished.exists():
            result = SelectionResult.from_json(finished.read_text())
        else:
            result = search_layers(trial.model, trial.task, trial.seed, finetune=dict(trial.finetune_settings),
                                   on_step=on_step, resume_from=resume_from, **settings)

    def save_selection(directory: str) -> None:
        (Path(directory) / SELECTION_FILE).write_text(result.to_json())

    summary = {k: v for k, v in result.to_dict().items() if k not in _CURVES}
    _report({**unset, **identity, "blocks": format_blocks(result.blocks), "num_blocks": len(result.blocks),
             "num_blocks_total": result.num_blocks_total, "alpha": [float(a) for a in result.alpha],
             "compute_s": result.compute_s, "flops": result.flops, "step": result.steps,
             ALPHA_SEPARATION: result.alpha_separation, "selection": json.dumps(summary), "progress": 1.0,
             "final": True}, save_selection)


def _run_probe(trial: TrialConfig, settings: dict[str, Any], identity: dict[str, Any]) -> None:
    from .probes import ProbeResult, run_probe

    unset = {**SEARCH_PLACEHOLDERS, FINETUNE_STEP: 0}

    def on_step(metrics: dict[str, Any]) -> None:
        own = {SEARCH_TRAIN_LOSS if k == TRAIN_LOSS else k: v for k, v in metrics.items()}
        _report({**own, **unset, **identity, "progress": metrics["step"] / metrics["total_steps"], "final": False})

    with _resume_dir() as resume_from:
        finished = Path(resume_from) / PROBE_FILE if resume_from else None
        if finished is not None and finished.exists():
            result = ProbeResult.from_json(finished.read_text())
        else:
            result = run_probe(str(trial.probe), trial.model, trial.task, trial.seed,
                               finetune=dict(trial.finetune_settings), on_step=on_step, **settings)

    def save_probe(directory: str) -> None:
        (Path(directory) / PROBE_FILE).write_text(result.to_json())

    losses = {SEARCH_TRAIN_LOSS: result.train_loss, SEARCH_VAL_LOSS: result.search_val_loss}
    _report({**unset, **identity, **{k: v for k, v in losses.items() if v is not None},
             "blocks": format_blocks(result.blocks), "num_blocks": len(result.blocks),
             "num_blocks_total": result.num_blocks_total, PROBE_SCORES: list(result.scores),
             PROBE_RANKING: list(result.ranking), "threshold": result.threshold, "compute_s": result.compute_s,
             "flops": result.flops, "step": result.steps, "total_steps": result.steps,
             "examples_seen": result.examples_seen, "val_examples_seen": result.val_examples_seen,
             "progress": 1.0, "final": True}, save_probe)


def selection_from_analysis(analysis, metric: str = "val_accuracy", mode: str = "max"):
    """The Flexora `SelectionResult` behind a Tune run (`ExperimentAnalysis` or `ResultGrid`): the search whose
    selection's fine-tune scored best on `metric` (a validation metric), or the first search when none of
    its selections was fine-tuned."""
    from .flexora import SelectionResult

    return SelectionResult.from_dict(best_search_selection(trial_outcomes(analysis), metric, mode))
