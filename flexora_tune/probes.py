"""Cheap importance probes: rank the transformer blocks by a one-pass signal instead of Flexora's bilevel search,
so that a comparison can ask whether the search beats a cheap ranking.

- ``lora-norm`` (after LoRA-drop): LoRA on every block, trained as Flexora's search trains its LoRA (the same
  seeded LoRA, search set, batches, AdamW and schedule, for the search's planned number of steps; no gates and
  no early stop), then each block scores the mean per-token norm of its LoRA output, the adapter's contribution
  ``scaling * B A x``, on search-validation batches (padding excluded, dropout off), summed over the block's
  adapted modules.
- ``grad-norm``: at initialisation, before any step. LoRA's B starts at zero, so the gradient with respect to A
  is exactly zero and the one with respect to B (``scaling * dL/dh (A x)^T``) carries all of it; a block scores
  the norm of the training-loss gradient with respect to its LoRA weights (A and B of every adapted module), for
  the mean loss over the first `grad_batches` batches of the search set (those Flexora's first steps train on).

Both rank with `blocks.rank_blocks` and keep blocks with Flexora's rules on the scores (`select_blocks`): the
`top_k` highest when ``top_k`` is given, else those scoring above the mean score. Their compute is counted on
the search's FLOPs axis (`flops.py`): a LoRA step per training batch, a forward pass per scoring batch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import BlockLayout, BlockSelection, lora_layers, rank_blocks
from .finetune import FinetuneSettings
from .flexora.api import open_search_session
from .flexora.result import BlockChoice
from .flexora.selection import select_blocks
from .flexora.settings import SearchSettings
from .flops import FlopModel, batch_tokens
from .tasks import TaskData, TaskSpec
from .training import DIVERGED_LOSS, build_optimizer, check_loss, check_positive, settings_from

#: The probes, by the names `compare` and the trainable's ``probe`` key use.
PROBES = ("lora-norm", "grad-norm")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
BatchFn = Callable[[int], Any]
OnProbeStep = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ProbeSettings(SearchSettings):
    """The settings of the Flexora search a probe stands beside (it trains on that search's set, batches and
    length, with its LoRA, learning rate and schedule; the gate fields are unused), and the probe's own."""

    grad_batches: int = 8
    """grad-norm: training batches whose mean loss is differentiated (at most one pass over the search set)."""
    score_batches: int | None = None
    """lora-norm: search-validation batches scored; None: one pass over the task's ``search_val`` split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "grad_batches")
        if self.score_batches is not None:
            check_positive(self, "score_batches")


@dataclass
class ProbeResult(BlockChoice):
    """A probe's scores (one per block), their ranking (`rank_blocks`), the kept blocks and the rule that kept
    them, and what it cost: `steps` LoRA steps (lora-norm) or gradient batches (grad-norm), the examples they
    used, `compute_s` and `flops` (the search's axis, `flops.py`)."""

    probe: str
    blocks: tuple[int, ...]
    num_blocks_total: int
    scores: list[float]
    ranking: list[int]
    rule: str
    threshold: float
    seed: int
    steps: int
    examples_seen: int
    val_examples_seen: int
    compute_s: float
    flops: float
    model: str
    task: str
    target_modules: tuple[str, ...]
    layers_pattern: str
    task_type: str | None = None
    train_loss: float | None = None
    """lora-norm: mean training loss of the last `report_every` steps; grad-norm: at initialisation."""
    search_val_loss: float | None = None
    """lora-norm: mean loss of the scoring batches after training; grad-norm: None."""
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {self.probe!r}")
        self.blocks = BlockSelection(tuple(self.blocks), self.num_blocks_total).blocks
        self.target_modules = tuple(self.target_modules)
        self.ranking = [int(b) for b in self.ranking]
        self.settings = json.loads(json.dumps(self.settings))
        if len(self.scores) != self.num_blocks_total or sorted(self.ranking) != list(range(self.num_blocks_total)):
            raise ValueError(f"{len(self.scores)} scores and ranking {self.ranking} for {self.num_blocks_total} blocks")


class LoraOutputNorms:
    """Forward hooks on every LoRA branch (``lora_B``) of a peft model, recording the per-token norm of what the
    branch adds (``scaling * B A x``); `mask` (the current batch's attention mask, when set) excludes padding.
    Use as a context manager around forward passes; `scores()` is then, per block, the sum over its adapted
    modules of their mean norm over every recorded token (0 for a block without LoRA)."""

    def __init__(self, model: nn.Module, layout: BlockLayout) -> None:
        self.model, self.layout = model, layout
        self.mask: torch.Tensor | None = None
        self._totals: list[tuple[int, list[float]]] = []
        self._handles: list[Any] = []

    def _hook(self, scale: float, acc: list[float]):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            norms = output.detach().float().norm(dim=-1) * abs(scale)
            mask = self.mask
            if mask is not None and tuple(mask.shape) == tuple(norms.shape):
                weights = mask.to(norms.dtype)
                acc[0] += (norms * weights).sum().item()
                acc[1] += weights.sum().item()
            else:
                acc[0] += norms.sum().item()
                acc[1] += norms.numel()

        return record

    def __enter__(self) -> LoraOutputNorms:
        for block, _, module in lora_layers(self.model, self.layout):
            for adapter, lora_b in module.lora_B.items():
                acc = [0.0, 0.0]
                self._totals.append((block, acc))
                self._handles.append(lora_b.register_forward_hook(self._hook(float(module.scaling[adapter]), acc)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def scores(self) -> list[float]:
        out = [0.0] * self.layout.num_blocks
        for block, (total, count) in self._totals:
            if count:
                out[block] += total / count
        return out


def lora_grad_norms(model: nn.Module, layout: BlockLayout) -> list[float]:
    """Per block, the norm of the ``.grad`` of its LoRA weights (A and B of every adapted module; 0 without)."""
    sums = [0.0] * layout.num_blocks
    for block, _, module in lora_layers(model, layout):
        for adapter in module.lora_A:
            for weight in (module.lora_A[adapter].weight, module.lora_B[adapter].weight):
                if weight.grad is not None:
                    sums[block] += weight.grad.detach().double().pow(2).sum().item()
    return [math.sqrt(s) for s in sums]


class BlockProbe:
    """A probe ready to run on a peft `model` with fresh LoRA on every block (`layout`), on any data: batches are
    functions of their index (``train_batch(step)``, ``val_batch(j)``), as in `BilevelLoop`, so a probe is a pure
    function of its seed and settings. One probe per instance (lora-norm trains the LoRA weights).

    `total_steps` is lora-norm's training length (the search's); `train_pass_batches` caps grad-norm's batches
    at one pass over the search set; `val_pass_batches` is lora-norm's default scoring length.
    """

    def __init__(self, model: nn.Module, layout: BlockLayout, loss: LossFn, train_batch: BatchFn, val_batch: BatchFn,
                 settings: ProbeSettings, total_steps: int, seed: int = 0, *, train_pass_batches: int | None = None,
                 val_pass_batches: int = 1, identity: dict[str, Any] | None = None,
                 flop_model: FlopModel | None = None) -> None:
        if total_steps < 1:
            raise ValueError(f"the probe needs at least one step, got {total_steps}")
        self.model, self.layout, self.loss = model, layout, loss
        self.train_batch, self.val_batch = train_batch, val_batch
        self.settings, self.total_steps, self.seed = settings, total_steps, seed
        self.grad_batches = min(settings.grad_batches, train_pass_batches or settings.grad_batches)
        self.score_batches = settings.score_batches or val_pass_batches
        self.identity = identity or {}
        self.flop_model = flop_model or FlopModel.from_model(model, layout)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters; attach LoRA before probing")

    def _loss(self, batch: Any, where: str, what: str) -> torch.Tensor:
        loss = self.loss(self.model, batch)
        s = self.settings
        check_loss(loss, where, what, f"lower the LoRA learning rate (lr={s.lr}), or probe in float32 "
                   "(dtype='float32') if you are using float16/bfloat16; the ranking is not trustworthy", DIVERGED_LOSS)
        return loss

    @staticmethod
    def _size(batch: Any) -> int:
        return int(getattr(batch, "size", 0) or 0)

    def run(self, probe: str, on_step: OnProbeStep | None = None, verbose: bool = False) -> ProbeResult:
        """Run `probe` (one of `PROBES`)."""
        if probe == "lora-norm":
            return self.lora_norm(on_step, verbose)
        if probe == "grad-norm":
            return self.grad_norm(verbose)
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")

    def lora_norm(self, on_step: OnProbeStep | None = None, verbose: bool = False) -> ProbeResult:
        """Train LoRA `total_steps` steps, then score each block's LoRA output norm on `score_batches` batches.
        ``on_step(metrics)`` is called every `report_every` steps before the last (progress only)."""
        s = self.settings
        optimizer, scheduler = build_optimizer(self.params, s.lr, s.weight_decay, s.warmup_ratio, self.total_steps)
        compute_s, flops, examples, window = 0.0, 0, 0, []
        self.model.train()
        for step in range(self.total_steps):
            started = time.perf_counter()
            batch = self.train_batch(step)
            loss = self._loss(batch, f"probe step {step + 1} (lora-norm)", "the training loss")
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.item())
            compute_s += time.perf_counter() - started
            examples += self._size(batch)
            flops += self.flop_model.train_step(batch_tokens(batch))
            done = step + 1
            if done % s.report_every == 0 and done < self.total_steps:
                metrics = {"step": done, "total_steps": self.total_steps, "train_loss": math.fsum(window) / len(window),
                           "compute_s": compute_s, "flops": float(flops), "examples_seen": examples}
                if verbose:
                    print(f"[lora-norm] step {done}/{self.total_steps} loss {metrics['train_loss']:.4f}", flush=True)
                if on_step is not None:
                    on_step(metrics)
                window = []
        started = time.perf_counter()
        self.model.eval()
        val_loss, val_examples = 0.0, 0
        with torch.no_grad(), LoraOutputNorms(self.model, self.layout) as norms:
            for j in range(self.score_batches):
                batch = self.val_batch(j)
                norms.mask = getattr(batch, "attention_mask", None)
                val_loss += self._loss(batch, f"scoring batch {j + 1} (lora-norm)", "the search-validation loss").item()
                val_examples += self._size(batch)
                flops += self.flop_model.forward(batch_tokens(batch))
        compute_s += time.perf_counter() - started
        return self._result("lora-norm", norms.scores(), self.total_steps, examples, val_examples, compute_s, flops,
                            math.fsum(window) / len(window), val_loss / self.score_batches)

    def grad_norm(self, verbose: bool = False) -> ProbeResult:
        """Score each block by the norm of the training-loss gradient w.r.t. its LoRA weights at initialisation,
        for the mean loss of the first `grad_batches` training batches; no weight changes."""
        started = time.perf_counter()
        self.model.train()
        for p in self.params:
            p.grad = None
        total, flops, examples = 0.0, 0, 0
        for j in range(self.grad_batches):
            batch = self.train_batch(j)
            loss = self._loss(batch, f"gradient batch {j + 1} (grad-norm)", "the training loss")
            (loss / self.grad_batches).backward()
            total += loss.item()
            examples += self._size(batch)
            flops += self.flop_model.train_step(batch_tokens(batch))
        scores = lora_grad_norms(self.model, self.layout)
        for p in self.params:
            p.grad = None
        compute_s = time.perf_counter() - started
        if verbose:
            print(f"[grad-norm] {self.grad_batches} batches, ranking {rank_blocks(scores)}", flush=True)
        return self._result("grad-norm", scores, self.grad_batches, examples, 0, compute_s, flops,
                            total / self.grad_batches, None)

    def _result(self, probe: str, scores: list[float], steps: int, examples: int, val_examples: int, compute_s: float,
                flops: int, train_loss: float, val_loss: float | None) -> ProbeResult:
        s = self.settings
        rule = "top_k" if s.top_k is not None else "mean"
        blocks, threshold = select_blocks(scores, rule, s.top_k, s.min_blocks, s.max_blocks)
        return ProbeResult(
            probe=probe, blocks=blocks, num_blocks_total=self.layout.num_blocks, scores=[float(v) for v in scores],
            ranking=rank_blocks(scores), rule=rule, threshold=threshold, seed=self.seed, steps=steps,
            examples_seen=examples, val_examples_seen=val_examples, compute_s=compute_s, flops=float(flops),
            model=str(self.identity.get("model", "")), task=str(self.identity.get("task", "")),
            target_modules=tuple(self.identity.get("target_modules") or self.layout.target_modules),
            layers_pattern=self.layout.pattern, task_type=self.identity.get("task_type"), train_loss=train_loss,
            search_val_loss=val_loss, settings=asdict(s),
        )


def open_probe(model: str = "default", task: str | dict | TaskSpec | TaskData = "default", seed: int = 0, *,
               finetune: FinetuneSettings | dict[str, Any] | None = None, **settings: Any) -> BlockProbe:
    """Load `model` for `task` with seeded LoRA on every block, on the search set, batches and planned length a
    Flexora search with the same settings and `finetune` would use (`flexora.api.open_search_session`).
    Keyword `settings` are the fields of `ProbeSettings` (those of `SearchSettings`, ``top_k`` included)."""
    config: ProbeSettings = settings_from(ProbeSettings, settings)
    opened = open_search_session(model, task, seed, config, finetune)
    return BlockProbe(
        opened.session.model, opened.session.layout, opened.loss, opened.train_batch, opened.val_batch, config,
        opened.total_steps, seed, train_pass_batches=math.ceil(len(opened.search_set) / config.batch_size),
        val_pass_batches=opened.val_pass_batches, identity=opened.identity, flop_model=opened.session.flop_model,
    )


def run_probe(probe: str, model: str = "default", task: str | dict | TaskSpec | TaskData = "default", seed: int = 0,
              *, finetune: FinetuneSettings | dict[str, Any] | None = None, on_step: OnProbeStep | None = None,
              verbose: bool = False, **settings: Any) -> ProbeResult:
    """Rank the blocks of `model` for `task` with `probe` (``"lora-norm"`` or ``"grad-norm"``); see the module
    docstring for the definitions, `open_probe` for the data and settings. Deterministic for a seed."""
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    return open_probe(model, task, seed, finetune=finetune, **settings).run(probe, on_step, verbose)


def lora_norm_ranking(model: str = "default", task: str | dict | TaskSpec | TaskData = "default", seed: int = 0, *,
                      finetune: FinetuneSettings | dict[str, Any] | None = None, on_step: OnProbeStep | None = None,
                      verbose: bool = False, **settings: Any) -> ProbeResult:
    """The lora-norm probe: LoRA on every block trained for Flexora's default search length on its search set
    (`default_search_steps`, sized against `finetune`), then blocks ranked by the mean norm of their LoRA output
    on search-validation batches; ``top_k=k`` keeps k blocks, else those above the mean score."""
    return run_probe("lora-norm", model, task, seed, finetune=finetune, on_step=on_step, verbose=verbose, **settings)


def grad_norm_ranking(model: str = "default", task: str | dict | TaskSpec | TaskData = "default", seed: int = 0, *,
                      finetune: FinetuneSettings | dict[str, Any] | None = None, verbose: bool = False,
                      **settings: Any) -> ProbeResult:
    """The grad-norm probe: blocks ranked by the norm of the training-loss gradient w.r.t. their LoRA weights at
    initialisation, over the first `grad_batches` batches of Flexora's search set; ``top_k=k`` keeps k blocks,
    else those above the mean score."""
    return run_probe("grad-norm", model, task, seed, finetune=finetune, verbose=verbose, **settings)
