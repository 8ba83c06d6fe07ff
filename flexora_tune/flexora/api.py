"""The public entry points of stage 1: a search ready to run on a model and task named by strings
(`prepare_search`), the search itself (`search_layers`), and both stages chained (`run_pipeline`)."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..finetune import FinetuneResult, FinetuneSettings, planned_steps
from ..finetune import finetune as finetune_blocks
from ..objective import encode, loss_fn
from ..tasks import Example, TaskData, TaskSpec, load_task
from ..training import LoraSession, epoch_batch, open_lora_session, settings_from
from .loop import BilevelLoop, OnStep
from .result import SelectionResult
from .settings import SearchSettings
from .sizing import SHORT_SEARCH, default_search_steps, search_set_size


@lru_cache(maxsize=8)
def _val_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    items = list(range(n))
    random.Random(f"search_val:{seed}:{epoch}").shuffle(items)
    return tuple(items)


def _cyclic_indices(n: int, seed: int, start: int, size: int) -> list[int]:
    """Positions start..start+size of an endless stream of seeded shuffles of range(n)."""
    return [_val_order(n, seed, pos // n)[pos % n] for pos in range(start, start + size)]


@dataclass
class SearchSession:
    """What a Flexora search trains and validates on, built from a model and task named by strings: the model
    with seeded LoRA on every block (`session`), the search set, the planned length, and the batch functions.
    `prepare_search` gates it into a `BilevelLoop`; the probes (`probes.py`) train and score on the very same
    set, batches and length, so the two are comparable step for step."""

    session: LoraSession
    settings: SearchSettings
    search_set: tuple[Example, ...]
    total_steps: int
    train_batch: Callable[[int], Any]
    val_batch: Callable[[int], Any]
    loss: Callable[[Any, Any], Any]
    identity: dict[str, Any]

    @property
    def val_pass_batches(self) -> int:
        """Search-validation batches that visit the ``search_val`` split once (the last one may wrap)."""
        size = self.settings.val_batch_size or self.settings.batch_size
        return math.ceil(len(self.session.task.search_val) / size)


def open_search_session(
    model: str,
    task: str | dict | TaskSpec | TaskData,
    seed: int,
    config: SearchSettings,
    finetune: FinetuneSettings | dict[str, Any] | None = None,
) -> SearchSession:
    """Load `model` for `task` with seeded LoRA on every block, and the search's data: the search set
    (`search_set_size`) visited in a seeded order per epoch, search-validation batches cycling through the
    task's ``search_val`` split in a seeded order, and the length (`config.steps`, else
    `default_search_steps` against `finetune`)."""
    if isinstance(finetune, dict):
        finetune = settings_from(FinetuneSettings, finetune)
    data = task if isinstance(task, TaskData) else load_task(task)
    if not data.search_val:
        raise ValueError(f"{data.spec.name} has no search_val split; set the task's search_val_size")
    search_set = data.train[: search_set_size(len(data.train), config, finetune)]
    if not search_set:
        raise ValueError(f"{data.spec.name} has no training examples to search with")
    total_steps = config.steps or default_search_steps(len(data.train), config, finetune)
    session = open_lora_session(model, data, None, config, seed)
    val_size = config.val_batch_size or config.batch_size
    max_length = config.search_max_length or data.spec.max_length
    kind, tokenizer, device = data.kind, session.tokenizer, session.device

    def train_batch(step: int):
        chunk = epoch_batch(search_set, config.batch_size, seed, step)
        return encode(chunk, tokenizer, kind, max_length).to(device)

    def val_batch(index: int):
        picked = _cyclic_indices(len(data.search_val), seed, index * val_size, val_size)
        chunk = [data.search_val[i] for i in picked]
        return encode(chunk, tokenizer, kind, max_length).to(device)

    identity = {"model": model, "task": data.spec.name, "target_modules": config.target_modules,
                "task_type": "SEQ_CLS" if kind == "classification" else "CAUSAL_LM"}
    return SearchSession(session, config, search_set, total_steps, train_batch, val_batch,
                         lambda m, b: loss_fn(m, b, kind), identity)


def prepare_search(
    model: str = "default",
    task: str | dict | TaskSpec | TaskData = "default",
    seed: int = 0,
    *,
    finetune: FinetuneSettings | dict[str, Any] | None = None,
    **settings: Any,
) -> BilevelLoop:
    """Load `model` for `task`, attach seeded LoRA to every block and gate it: a search ready to `run`.

    The search set (`search_set_size`) is visited in a seeded order per epoch; search-validation batches
    cycle through the task's ``search_val`` split in a seeded order (`open_search_session`). Without `steps`,
    the search is sized against `finetune` (the settings of the fine-tune that follows; None: one pass over
    the search set), see `default_search_steps`. Keyword `settings` are the fields of `SearchSettings`.
    """
    config: SearchSettings = settings_from(SearchSettings, settings)
    if isinstance(finetune, dict):
        finetune = settings_from(FinetuneSettings, finetune)
    opened = open_search_session(model, task, seed, config, finetune)
    total_steps = opened.total_steps
    if total_steps < SHORT_SEARCH and not config.steps:
        train_size = len(opened.session.task.train)
        warnings.warn(f"the search is sized to only {total_steps} steps (the reference's share of a "
                      f"{planned_steps(train_size, finetune) if finetune else 'one-pass'}-step fine-tune); "
                      "alpha may not have separated the blocks yet: set steps= for a longer search", stacklevel=2)
    return BilevelLoop(
        opened.session.model, opened.session.layout, opened.loss, opened.train_batch, opened.val_batch, config,
        total_steps, seed, flop_model=opened.session.flop_model, identity=opened.identity,
    )


def search_layers(
    model: str = "default",
    task: str | dict | TaskSpec | TaskData = "default",
    seed: int = 0,
    *,
    finetune: FinetuneSettings | dict[str, Any] | None = None,
    on_step: OnStep | None = None,
    resume_from: str | Path | None = None,
    verbose: bool = False,
    **settings: Any,
) -> SelectionResult:
    """Search which blocks of `model` should get LoRA for `task` (Flexora, stage 1).

    Attaches LoRA to every block, gates each block, and alternates LoRA steps on the search set with gate
    steps on the search-validation split (see `prepare_search`), then applies the selection rule.
    ``on_step(metrics, save_state)`` is called every `report_every` steps and at the end; `save_state(dir)`
    writes a checkpoint that ``resume_from=dir`` continues exactly (same seed and settings). Keyword
    `settings` are the fields of `SearchSettings`; `finetune` (the following fine-tune's settings) sizes a
    search without `steps`. Raises FloatingPointError, naming the step, if a loss or alpha stops being finite.
    """
    search = prepare_search(model, task, seed, finetune=finetune, **settings)
    return search.run(on_step=on_step, resume_from=resume_from, verbose=verbose)


@dataclass
class PipelineResult:
    """Both stages of one Flexora run: the search's selection and the fine-tune on it."""

    search: SelectionResult
    finetune: FinetuneResult

    @property
    def compute_s(self) -> float:
        return self.search.compute_s + self.finetune.compute_s

    @property
    def flops(self) -> float:
        """Both stages' FLOPs (the fine-tune's validation included, its test evaluation not)."""
        return self.search.flops + self.finetune.flops

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.search.to_dict(), "finetune": self.finetune.to_dict(),
                "compute_s": self.compute_s, "flops": self.flops}


_CARRIED = ("r", "lora_alpha", "lora_dropout", "target_modules", "device", "dtype", "threads", "trust_remote_code")


def run_pipeline(
    model: str = "default",
    task: str | dict | TaskSpec | TaskData = "default",
    seed: int = 0,
    search: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    *,
    verbose: bool = False,
) -> PipelineResult:
    """Search the blocks, then fine-tune fresh LoRA (reloaded model, A random, B zero) on them only.

    `search` and `finetune` are keyword settings of `SearchSettings` and `FinetuneSettings`. The LoRA shape
    and runtime settings (r, lora_alpha, lora_dropout, target_modules, device, dtype, threads) given to the
    search carry over to the fine-tune unless `finetune` sets them.
    """
    search = dict(search or {})
    data = task if isinstance(task, TaskData) else load_task(task)
    tune = {**{k: search[k] for k in _CARRIED if k in search}, **(finetune or {})}
    selection = search_layers(model, data, seed, finetune=tune, verbose=verbose, **search)
    result = finetune_blocks(model, data, blocks=selection.selection, seed=seed, verbose=verbose, **tune)
    return PipelineResult(selection, result)
