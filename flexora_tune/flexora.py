"""The Flexora search: learn one gate per block by bilevel optimisation, keep the blocks whose gate ends
high, and fine-tune fresh LoRA on those blocks only.

`search_layers` runs the search on a model and task named by strings; `FlexoraSearch` is the loop itself
on any peft-wrapped model (the tests drive it with purpose-built models); `run_pipeline` chains the search
and `finetune`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .blocks import BlockLayout, BlockSelection, rank_blocks
from .finetune import (
    FinetuneResult,
    FinetuneSettings,
    LoraSettings,
    _check_positive,
    _epoch_order,
    open_lora_session,
    planned_steps,
    settings_from,
)
from .finetune import finetune as finetune_blocks
from .gates import BlockGates
from .objective import encode, loss_fn
from .tasks import TaskData, TaskSpec, load_task

STATE_FILE = "search_state.pt"
REFERENCE_SEARCH_SET = 5000
SHORT_SEARCH = 10
HYPERGRADIENTS = ("first_order", "second_order")
RULES = ("mean", "top_k")
MAX_RECORDS = 1000

LossFn = Callable[[nn.Module, Any], torch.Tensor]
BatchFn = Callable[[int], Any]
OnStep = Callable[[dict[str, Any], Callable[[str | Path], None]], None]


@dataclass(frozen=True)
class SearchSettings(LoraSettings):
    """Stage-1 settings. Defaults follow the reference, scaled to the task and to the fine-tune.

    Length: `steps` alternating LoRA and gate steps; None sizes the search like the reference (see
    `default_search_steps`): one pass over the search set, shortened by the factor by which the fine-tune it
    precedes is capped, so the search keeps the reference's share of the compute. The search set is the
    first `search_train_size` training examples (None: up to 5,000, and never more than the fine-tune
    trains on). Each gate step accumulates the loss of `val_batches` search-validation batches of
    `val_batch_size` (None: `batch_size`) examples; `search_max_length` (None: the task's) cuts search sequences.
    LoRA: AdamW, `lr` with cosine decay after `warmup_ratio` warm-up; gates: Adam, `alpha_lr`, constant, no
    decay. `hypergradient` is ``first_order`` (the reference) or ``second_order`` (DARTS one-step unrolled,
    with virtual step size `unroll_lr`, None: the current LoRA learning rate). `rule` ``mean`` keeps blocks
    with alpha above the mean, ``top_k`` the `top_k` largest; `min_blocks`/`max_blocks` bound either.
    `stop_when_stable` (default 4; None runs every step) ends the search once the selection has not changed
    for that many steps and alpha's ranking has settled: its Spearman correlation with alpha that many steps
    earlier is at least `stable_rank_corr` (benchmarks/results/search_budget.md: what it saves). `on_step`
    is called every `report_every` steps; alpha is recorded every `record_every` steps (None: every step,
    thinned to at most 1,000 records).
    """

    steps: int | None = None
    search_train_size: int | None = None
    val_batches: int = 1
    val_batch_size: int | None = None
    search_max_length: int | None = None
    lr: float = 1e-4
    alpha_lr: float = 0.01
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    hypergradient: str = "first_order"
    unroll_lr: float | None = None
    rule: str = "mean"
    top_k: int | None = None
    min_blocks: int = 1
    max_blocks: int | None = None
    report_every: int = 10
    record_every: int | None = None
    stop_when_stable: int | None = 4
    stable_rank_corr: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "val_batches", "lr", "alpha_lr", "min_blocks", "report_every")
        for name in ("steps", "search_train_size", "val_batch_size", "search_max_length", "top_k", "max_blocks",
                     "record_every", "stop_when_stable", "unroll_lr"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(self, name)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.search_max_length is not None and self.search_max_length < 8:
            raise ValueError(f"search_max_length must be at least 8 tokens, got {self.search_max_length}")
        if not -1 <= self.stable_rank_corr <= 1:
            raise ValueError(f"stable_rank_corr is a correlation in [-1, 1], got {self.stable_rank_corr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.hypergradient not in HYPERGRADIENTS:
            raise ValueError(f"hypergradient must be one of {HYPERGRADIENTS}, got {self.hypergradient!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.rule == "top_k" and self.top_k is None:
            raise ValueError("rule='top_k' needs top_k (the number of blocks to keep)")
        if self.max_blocks is not None and self.max_blocks < self.min_blocks:
            raise ValueError(f"max_blocks ({self.max_blocks}) must be >= min_blocks ({self.min_blocks})")
        if self.rule == "top_k" and not self.min_blocks <= self.top_k <= (self.max_blocks or self.top_k):
            raise ValueError(f"top_k ({self.top_k}) must lie within min_blocks..max_blocks "
                             f"({self.min_blocks}..{self.max_blocks})")


def select_blocks(
    alpha: Sequence[float],
    rule: str = "mean",
    top_k: int | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
) -> tuple[tuple[int, ...], float]:
    """The blocks a rule keeps, and the rule's threshold on alpha.

    ``mean``: alpha above mean(alpha) (gate above 1); ``top_k``: the `top_k` largest (threshold: the smallest
    kept alpha). Then at least `min_blocks` and at most `max_blocks`, taking or dropping by alpha (ties: lower
    index first), so the selection is never empty.
    """
    values = [float(a) for a in alpha]
    total = len(values)
    if total == 0:
        raise ValueError("alpha is empty: there are no blocks to select from")
    if min_blocks > total:
        raise ValueError(f"min_blocks={min_blocks} but the model has only {total} blocks")
    ranked = rank_blocks(values)
    if rule == "mean":
        threshold = math.fsum(values) / total
        chosen = [i for i in range(total) if values[i] > threshold]
    elif rule == "top_k":
        if top_k is None or not 1 <= top_k <= total:
            raise ValueError(f"top_k must be in 1..{total} (the number of blocks), got {top_k}")
        chosen = ranked[:top_k]
        threshold = values[ranked[top_k - 1]]
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    high = total if max_blocks is None else min(max_blocks, total)
    if len(chosen) < min_blocks:
        chosen = ranked[:min_blocks]
    elif len(chosen) > high:
        chosen = ranked[:high]
    return tuple(sorted(chosen)), threshold


def search_set_size(train_size: int, search: SearchSettings, finetune: FinetuneSettings | None = None) -> int:
    """Examples the search trains LoRA on: the first `search_train_size` (None: up to 5,000) of the training
    set, and never more than the fine-tune it precedes uses."""
    available = train_size
    if finetune is not None and finetune.max_train_examples:
        available = min(available, finetune.max_train_examples)
    return min(available, search.search_train_size or REFERENCE_SEARCH_SET)


def default_search_steps(train_size: int, search: SearchSettings, finetune: FinetuneSettings | None = None) -> int:
    """The reference's search length on a training set of `train_size` examples.

    The reference makes one pass over a 5,000-example search set and then fine-tunes three epochs on up to
    20,000 examples: the search trains LoRA on a twelfth of the fine-tune's examples, and since a search step
    costs about two LoRA steps, it spends about a fifth of the fine-tune's compute. Here the search makes one
    pass over its search set (`search_set_size`); when `finetune` is capped by `max_steps`, the pass is
    shortened by the same factor, so the proportion between the two stages stays the reference's.
    """
    one_pass = math.ceil(search_set_size(train_size, search, finetune) / search.batch_size)
    if finetune is None:
        return one_pass
    uncapped = planned_steps(train_size, replace(finetune, max_steps=None))
    return max(1, round(one_pass * planned_steps(train_size, finetune) / uncapped))


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties share their mean rank); 0 when either
    is constant, since a constant sequence has no ranking."""
    if len(a) != len(b):
        raise ValueError(f"rank_correlation needs equally long sequences, got {len(a)} and {len(b)}")
    rho = pd.Series(a, dtype=float).rank().corr(pd.Series(b, dtype=float).rank())
    return 0.0 if math.isnan(rho) else float(rho)


def settled_correlation(
    stable_steps: int, recent_alpha: Sequence[Sequence[float]], window: int, threshold: float
) -> float | None:
    """The stop-when-stable criterion: alpha's rank correlation with `window` steps ago when the selection
    has been unchanged for `stable_steps` >= `window` steps and that correlation is at least `threshold`;
    otherwise None. `recent_alpha` holds alpha after each step, ending with the current one."""
    if stable_steps < window or len(recent_alpha) <= window:
        return None
    rho = rank_correlation(recent_alpha[-1 - window], recent_alpha[-1])
    return rho if rho >= threshold else None


@dataclass
class SelectionResult:
    """What a search found and what it cost: the kept blocks, the final alpha and gates, their history,
    the rule and threshold used, and enough of the model's layout to export a peft `LoraConfig`. It ran
    `steps` of `planned_steps` steps; `stop_reason` says why it ended there."""

    blocks: tuple[int, ...]
    num_blocks_total: int
    alpha: list[float]
    gates: list[float]
    rule: str
    threshold: float
    hypergradient: str
    seed: int
    steps: int
    compute_s: float
    examples_seen: int
    val_examples_seen: int
    model: str
    task: str
    target_modules: tuple[str, ...]
    layers_pattern: str
    task_type: str | None = None
    stop_reason: str = "steps"
    planned_steps: int | None = None
    trajectory_steps: list[int] = field(default_factory=list)
    alpha_trajectory: list[list[float]] = field(default_factory=list)
    val_loss_curve: list[float] = field(default_factory=list)
    train_loss_curve: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = BlockSelection(tuple(self.blocks), self.num_blocks_total).blocks
        self.target_modules = tuple(self.target_modules)
        self.settings = json.loads(json.dumps(self.settings))
        if len(self.alpha) != self.num_blocks_total:
            raise ValueError(f"{len(self.alpha)} alpha values for {self.num_blocks_total} blocks")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def selection(self) -> BlockSelection:
        return BlockSelection(self.blocks, self.num_blocks_total)

    def to_lora_config(self, **lora_kwargs: Any):
        """A peft `LoraConfig` with LoRA on exactly the selected blocks; rank, lora_alpha, dropout and task
        type default to the search's, any `LoraConfig` field can be overridden."""
        defaults = {k: self.settings[k] for k in ("r", "lora_alpha", "lora_dropout") if k in self.settings}
        options = {"target_modules": self.target_modules, "layers_pattern": self.layers_pattern,
                   "task_type": self.task_type, **defaults, **lora_kwargs}
        return self.selection.to_lora_config(**options)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocks"] = list(self.blocks)
        data["target_modules"] = list(self.target_modules)
        return data

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectionResult:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SelectionResult field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_analysis(cls, analysis: Any, metric: str = "val_accuracy", mode: str = "max") -> SelectionResult:
        """The search result behind a Ray Tune run (`tune.run`'s analysis or `Tuner.fit`'s result grid): the
        search whose selection's fine-tune scored best on the validation `metric`."""
        from .results import best_search_selection, trial_outcomes

        return cls.from_dict(best_search_selection(trial_outcomes(analysis), metric, mode))

    @classmethod
    def from_json(cls, text: str) -> SelectionResult:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a SelectionResult JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except TypeError as exc:
            raise ValueError(f"not a SelectionResult JSON: {exc}") from exc


def _nonfinite(what: str, value: float, step: int, config: SearchSettings) -> FloatingPointError:
    return FloatingPointError(
        f"{what} became {value} at search step {step} ({config.hypergradient}): lower the LoRA learning rate "
        f"(lr={config.lr}) or the gate learning rate (alpha_lr={config.alpha_lr}), or search in float32 "
        "(dtype='float32') if you are using float16/bfloat16; the selection so far is not trustworthy"
    )


class FlexoraSearch:
    """The alternating bilevel loop on a peft LoRA `model` whose blocks are described by `layout`.

    Each step: one AdamW step on the trainable (LoRA + head) weights with ``loss(model, train_batch(step))``
    and constant gates; then one Adam step on alpha with the loss of `val_batches` batches ``val_batch(j)``
    with the weights frozen and dropout off. Batches are functions of the step index, so a run is a pure
    function of its seed and settings and resumes exactly. Batches may expose a ``size`` (examples counted).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: BlockLayout,
        loss: LossFn,
        train_batch: BatchFn,
        val_batch: BatchFn,
        settings: SearchSettings,
        total_steps: int,
        seed: int = 0,
        identity: dict[str, Any] | None = None,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"the search needs at least one step, got {total_steps}")
        if settings.min_blocks > layout.num_blocks:
            raise ValueError(f"min_blocks={settings.min_blocks} but the model has {layout.num_blocks} blocks")
        if settings.rule == "top_k" and settings.top_k > layout.num_blocks:
            raise ValueError(f"top_k={settings.top_k} but the model has {layout.num_blocks} blocks")
        self.model, self.layout, self.loss = model, layout, loss
        self.train_batch, self.val_batch = train_batch, val_batch
        self.config, self.total_steps, self.seed = settings, total_steps, seed
        self.identity = identity or {}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters; attach LoRA before searching")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.gates = BlockGates(layout.num_blocks, device=device, dtype=dtype)
        self.gates.attach(model, layout)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(settings.warmup_ratio * total_steps), total_steps
        )
        self.alpha_optimizer = torch.optim.Adam([self.gates.alpha], lr=settings.alpha_lr, weight_decay=0.0)
        self.record_every = settings.record_every or max(1, math.ceil(total_steps / MAX_RECORDS))
        self.progress: dict[str, Any] = {
            "step": 0, "compute_s": 0.0, "examples_seen": 0, "val_examples_seen": 0, "trajectory_steps": [],
            "alpha_trajectory": [], "val_loss_curve": [], "train_loss_curve": [], "stable_steps": 0,
            "blocks": None, "stop_reason": None, "since_report": [],
        }

    @property
    def alpha(self) -> torch.Tensor:
        return self.gates.alpha

    def _mode(self, lora: bool, gates: bool, train: bool) -> None:
        self.model.train(train)
        for p in self.params:
            p.requires_grad_(lora)
        self.gates.alpha.requires_grad_(gates)

    def _count(self, batch: Any, key: str) -> None:
        self.progress[key] += int(getattr(batch, "size", 0) or 0)

    def _loss(self, batch: Any, step: int, what: str) -> torch.Tensor:
        loss = self.loss(self.model, batch)
        if not torch.isfinite(loss.detach()).all():
            raise _nonfinite(what, loss.detach().float().mean().item(), step, self.config)
        return loss

    def lora_grad(self, batch: Any, step: int = 0) -> float:
        """Backpropagate the training loss into the LoRA weights' ``.grad`` (gates constant, dropout on)."""
        self._mode(lora=True, gates=False, train=True)
        loss = self._loss(batch, step + 1, "the training loss")
        loss.backward()
        self._count(batch, "examples_seen")
        return loss.item()

    def lora_step(self, batch: Any, step: int = 0) -> float:
        """One AdamW step on the LoRA weights; returns the training loss."""
        value = self.lora_grad(batch, step)
        self._lora_update()
        return value

    def _lora_update(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def val_batches(self, step: int) -> list[Any]:
        n = self.config.val_batches
        return [self.val_batch(step * n + i) for i in range(n)]

    def gate_grad_first_order(self, val_batches: Sequence[Any], step: int = 0) -> float:
        """``alpha.grad`` = gradient of the mean validation loss at the current weights; returns that loss."""
        self._mode(lora=False, gates=True, train=False)
        self.gates.alpha.grad = None
        total = 0.0
        for batch in val_batches:
            loss = self._loss(batch, step + 1, "the search-validation loss") / len(val_batches)
            loss.backward()
            total += loss.item()
            self._count(batch, "val_examples_seen")
        self.gates.alpha.requires_grad_(False)
        return total

    def gate_grad_second_order(
        self, train_batch: Any, val_batches: Sequence[Any], xi: float, step: int = 0
    ) -> float:
        """``alpha.grad`` = DARTS's one-step unrolled hypergradient, with the weights' ``.grad`` holding
        grad_w L_train(w) (from `lora_grad`), which it leaves untouched:

        grad_a L_val(w') - xi (grad_a L_train(w+) - grad_a L_train(w-)) / (2 eps), where
        w' = w - xi grad_w L_train(w), w+- = w +- eps grad_w' L_val(w'), eps = 0.01 / ||grad_w' L_val(w')||.
        All of it runs with dropout off (the gate step); returns L_val(w').
        """
        alpha = self.gates.alpha
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p in self.params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=xi)
        self._mode(lora=True, gates=True, train=False)
        grad_alpha = torch.zeros_like(alpha)
        grad_w = [torch.zeros_like(p) for p in self.params]
        total = 0.0
        for batch in val_batches:
            loss = self._loss(batch, step + 1, "the search-validation loss") / len(val_batches)
            grads = torch.autograd.grad(loss, [alpha, *self.params], allow_unused=True)
            grad_alpha += grads[0]
            for acc, g in zip(grad_w, grads[1:], strict=True):
                if g is not None:
                    acc += g
            total += loss.item()
            self._count(batch, "val_examples_seen")
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grad_w)).item()
        if norm > 0 and xi > 0:
            eps = 0.01 / norm
            self._mode(lora=False, gates=True, train=False)
            train_grads = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, w, g in zip(self.params, saved, grad_w, strict=True):
                        p.copy_(w + sign * eps * g)
                loss = self._loss(train_batch, step + 1, "the training loss")
                train_grads.append(torch.autograd.grad(loss, alpha)[0])
            grad_alpha -= xi * (train_grads[0] - train_grads[1]) / (2 * eps)
        with torch.no_grad():
            for p, w in zip(self.params, saved, strict=True):
                p.copy_(w)
        alpha.grad = grad_alpha
        alpha.requires_grad_(False)
        return total

    def step(self, step: int) -> tuple[float, float]:
        """Search step `step` (0-based): the LoRA step, then the gate step; returns (train, val) loss."""
        train_batch = self.train_batch(step)
        val_batches = self.val_batches(step)
        if self.config.hypergradient == "first_order":
            train_loss = self.lora_step(train_batch, step)
            val_loss = self.gate_grad_first_order(val_batches, step)
        else:
            xi = self.config.unroll_lr
            if xi is None:
                xi = self.scheduler.get_last_lr()[0]
            train_loss = self.lora_grad(train_batch, step)
            val_loss = self.gate_grad_second_order(train_batch, val_batches, xi, step)
            self._lora_update()
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(self.gates.alpha).all():
            raise _nonfinite("alpha", self.gates.alpha.tolist(), step + 1, self.config)
        return train_loss, val_loss

    def current_selection(self) -> tuple[tuple[int, ...], float]:
        c = self.config
        return select_blocks(self.gates.alpha.tolist(), c.rule, c.top_k, c.min_blocks, c.max_blocks)

    def save_state(self, directory: str | Path) -> None:
        """Write everything `resume_from` needs to continue this run exactly."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {
            "weights": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params, strict=True)},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "alpha": self.gates.alpha.detach().cpu().clone(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "progress": copy.deepcopy(self.progress), "num_blocks": self.layout.num_blocks,
            "total_steps": self.total_steps,
        }
        torch.save(state, Path(directory) / STATE_FILE)

    def load_state(self, directory: str | Path) -> None:
        path = Path(directory) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no search state at {path}; pass a directory written by save_state")
        saved = torch.load(path, weights_only=False, map_location="cpu")
        if saved["num_blocks"] != self.layout.num_blocks:
            raise ValueError(f"the checkpoint is for {saved['num_blocks']} blocks, the model has "
                             f"{self.layout.num_blocks}")
        if saved["total_steps"] != self.total_steps:
            raise ValueError(f"the checkpoint is for a {saved['total_steps']}-step search, this one has "
                             f"{self.total_steps} steps; resume with the same settings")
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(saved["weights"][name])
            self.gates.alpha.copy_(saved["alpha"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.alpha_optimizer.load_state_dict(saved["alpha_optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.progress = saved["progress"]

    def _stable_reason(self, window: int) -> str | None:
        """Record this step's alpha; say why the search may stop now (selection unchanged for `window` steps
        and alpha's ranking settled against `window` steps ago), or None."""
        p = self.progress
        recent = p.setdefault("recent_alpha", [])
        recent.append(self.gates.alpha.tolist())
        del recent[: -(window + 1)]
        rho = settled_correlation(p["stable_steps"], recent, window, self.config.stable_rank_corr)
        if rho is None:
            return None
        return (f"stable: selection unchanged for {window} steps and alpha's rank correlation with step "
                f"{p['step'] - window} is {rho:.3f} (>= {self.config.stable_rank_corr})")

    def _record(self) -> None:
        self.progress["trajectory_steps"].append(self.progress["step"])
        self.progress["alpha_trajectory"].append(self.gates.alpha.tolist())

    def _metrics(self, blocks: tuple[int, ...], threshold: float) -> dict[str, Any]:
        p = self.progress
        recent = p["since_report"] or [(math.nan, math.nan)]
        alpha = self.gates.alpha.tolist()
        return {
            "step": p["step"], "total_steps": self.total_steps,
            "search_val_loss": math.fsum(v for _, v in recent) / len(recent),
            "train_loss": math.fsum(t for t, _ in recent) / len(recent),
            "compute_s": p["compute_s"], "examples_seen": p["examples_seen"],
            "val_examples_seen": p["val_examples_seen"], "num_blocks": len(blocks), "blocks": list(blocks),
            "num_blocks_total": self.layout.num_blocks, "alpha": alpha,
            "gates": self.gates.values().tolist(), "threshold": threshold, "stable_steps": p["stable_steps"],
        }

    def run(self, on_step: OnStep | None = None, resume_from: str | Path | None = None,
            verbose: bool = False) -> SelectionResult:
        """Run (or continue) the search to `total_steps` or until the selection is stable; select blocks.

        Every `report_every` steps, and at the end, calls ``on_step(metrics, save_state)``: the metrics'
        ``search_val_loss``/``train_loss`` are means over the steps since the previous report.
        """
        if resume_from is not None:
            self.load_state(resume_from)
        p, config = self.progress, self.config
        while p["step"] < self.total_steps and p["stop_reason"] is None:
            started = time.perf_counter()
            train_loss, val_loss = self.step(p["step"])
            p["compute_s"] += time.perf_counter() - started
            p["step"] += 1
            p["train_loss_curve"].append(train_loss)
            p["val_loss_curve"].append(val_loss)
            p["since_report"].append((train_loss, val_loss))
            blocks, threshold = self.current_selection()
            p["stable_steps"] = p["stable_steps"] + 1 if p["blocks"] == list(blocks) else 0
            p["blocks"] = list(blocks)
            if config.stop_when_stable:
                p["stop_reason"] = self._stable_reason(config.stop_when_stable)
            last = p["step"] == self.total_steps or p["stop_reason"] is not None
            if p["step"] % self.record_every == 0 or last:
                self._record()
            if p["step"] % config.report_every == 0 or last:
                metrics = self._metrics(blocks, threshold)
                p["since_report"] = []
                if verbose:
                    print(f"[flexora] step {p['step']}/{self.total_steps} "
                          f"val_loss {metrics['search_val_loss']:.4f} blocks {list(blocks)} "
                          f"({p['compute_s']:.1f}s)", flush=True)
                if on_step is not None:
                    on_step(metrics, self.save_state)
        return self.result()

    def result(self) -> SelectionResult:
        """The selection at the current alpha, with the run's history and cost."""
        p, c = self.progress, self.config
        blocks, threshold = self.current_selection()
        return SelectionResult(
            blocks=blocks, num_blocks_total=self.layout.num_blocks, alpha=self.gates.alpha.tolist(),
            gates=self.gates.values().tolist(), rule=c.rule, threshold=threshold,
            hypergradient=c.hypergradient,
            seed=self.seed, steps=p["step"], compute_s=p["compute_s"], examples_seen=p["examples_seen"],
            val_examples_seen=p["val_examples_seen"], model=str(self.identity.get("model", "")),
            task=str(self.identity.get("task", "")),
            target_modules=tuple(self.identity.get("target_modules") or self.layout.target_modules),
            layers_pattern=self.layout.pattern, task_type=self.identity.get("task_type"),
            stop_reason=p["stop_reason"] or f"completed {p['step']} steps", planned_steps=self.total_steps,
            trajectory_steps=list(p["trajectory_steps"]),
            alpha_trajectory=[list(a) for a in p["alpha_trajectory"]],
            val_loss_curve=list(p["val_loss_curve"]), train_loss_curve=list(p["train_loss_curve"]),
            settings=asdict(c),
        )


@lru_cache(maxsize=8)
def _val_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    items = list(range(n))
    random.Random(f"search_val:{seed}:{epoch}").shuffle(items)
    return tuple(items)


def _cyclic_indices(n: int, seed: int, start: int, size: int) -> list[int]:
    """Positions start..start+size of an endless stream of seeded shuffles of range(n)."""
    return [_val_order(n, seed, pos // n)[pos % n] for pos in range(start, start + size)]


def prepare_search(
    model: str = "default",
    task: str | dict | TaskSpec | TaskData = "default",
    seed: int = 0,
    *,
    finetune: FinetuneSettings | dict[str, Any] | None = None,
    **settings: Any,
) -> FlexoraSearch:
    """Load `model` for `task`, attach seeded LoRA to every block and gate it: a search ready to `run`.

    The search set (`search_set_size`) is visited in a seeded order per epoch; search-validation batches
    cycle through the task's ``search_val`` split in a seeded order. Without `steps`, the search is sized
    against `finetune` (the settings of the fine-tune that follows; None: one pass over the search set), see
    `default_search_steps`. Keyword `settings` are the fields of `SearchSettings`.
    """
    config: SearchSettings = settings_from(SearchSettings, settings)
    if isinstance(finetune, dict):
        finetune = settings_from(FinetuneSettings, finetune)
    data = task if isinstance(task, TaskData) else load_task(task)
    if not data.search_val:
        raise ValueError(f"{data.spec.name} has no search_val split; set the task's search_val_size")
    search_set = data.train[: search_set_size(len(data.train), config, finetune)]
    if not search_set:
        raise ValueError(f"{data.spec.name} has no training examples to search with")
    total_steps = config.steps or default_search_steps(len(data.train), config, finetune)
    if total_steps < SHORT_SEARCH and not config.steps:
        warnings.warn(f"the search is sized to only {total_steps} steps (the reference's share of a "
                      f"{planned_steps(len(data.train), finetune) if finetune else 'one-pass'}-step fine-tune); "
                      "alpha may not have separated the blocks yet: set steps= for a longer search", stacklevel=2)
    session = open_lora_session(model, data, None, config, seed)
    steps_per_epoch = math.ceil(len(search_set) / config.batch_size)
    val_size = config.val_batch_size or config.batch_size
    max_length = config.search_max_length or data.spec.max_length
    kind, tokenizer, device = data.kind, session.tokenizer, session.device

    def train_batch(step: int):
        epoch, position = divmod(step, steps_per_epoch)
        order = _epoch_order(len(search_set), seed, epoch)
        start = position * config.batch_size
        chunk = [search_set[i] for i in order[start : start + config.batch_size]]
        return encode(chunk, tokenizer, kind, max_length).to(device)

    def val_batch(index: int):
        picked = _cyclic_indices(len(data.search_val), seed, index * val_size, val_size)
        chunk = [data.search_val[i] for i in picked]
        return encode(chunk, tokenizer, kind, max_length).to(device)

    return FlexoraSearch(
        session.model, session.layout, lambda m, b: loss_fn(m, b, kind), train_batch, val_batch, config,
        total_steps, seed,
        identity={"model": model, "task": data.spec.name, "target_modules": config.target_modules,
                  "task_type": "SEQ_CLS" if kind == "classification" else "CAUSAL_LM"},
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

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.search.to_dict(), "finetune": self.finetune.to_dict(),
                "compute_s": self.compute_s}


_CARRIED = ("r", "lora_alpha", "lora_dropout", "target_modules", "device", "dtype", "threads")


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
