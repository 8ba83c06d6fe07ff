"""The bilevel loop itself: LoRA steps on training batches, gate steps on search-validation batches, and the
selection rule on the gates, on any peft-wrapped model."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..blocks import BlockLayout
from ..flops import FlopModel, batch_tokens
from ..gates import BlockGates
from ..stability import alpha_separation
from ..training import DIVERGED_LOSS, build_optimizer, check_loss, load_checkpoint, save_checkpoint
from .result import SelectionResult
from .selection import select_blocks, settled_correlation
from .settings import SearchSettings

STATE_FILE = "search_state.pt"
#: At most this many alpha records are kept when `record_every` is None.
MAX_RECORDS = 1000

LossFn = Callable[[nn.Module, Any], torch.Tensor]
BatchFn = Callable[[int], Any]
OnStep = Callable[[dict[str, Any], Callable[[str | Path], None]], None]


@dataclass
class SearchProgress:
    """Where a search stands; saved with every checkpoint and restored on resume."""

    step: int = 0
    """Steps done."""
    compute_s: float = 0.0
    """Seconds spent in search steps (not in reporting or checkpointing)."""
    examples_seen: int = 0
    """Training examples the LoRA steps consumed."""
    val_examples_seen: int = 0
    """Search-validation examples the gate steps consumed."""
    flops: int = 0
    """FLOPs of the steps done (`flops.py`: from the batches' tokens, never from timing)."""
    stable_steps: int = 0
    """Steps since the selection last changed."""
    blocks: list[int] | None = None
    """The selection after the last step."""
    stop_reason: str | None = None
    """Why the search ended early (stop-when-stable), or None."""
    trajectory_steps: list[int] = field(default_factory=list)
    alpha_trajectory: list[list[float]] = field(default_factory=list)
    val_loss_curve: list[float] = field(default_factory=list)
    train_loss_curve: list[float] = field(default_factory=list)
    since_report: list[list[float]] = field(default_factory=list)
    """(train loss, search-validation loss) of each step since the last report."""
    recent_alpha: list[list[float]] = field(default_factory=list)
    """Alpha after each of the last `stop_when_stable` + 1 steps."""


class BilevelLoop:
    """The alternating bilevel loop on a peft LoRA `model` whose blocks are described by `layout`.

    Each step: one AdamW step on the trainable (LoRA + head) weights with ``loss(model, train_batch(step))``
    and constant gates; then one Adam step on alpha with the loss of `val_batches` batches ``val_batch(j)``
    with the weights frozen and dropout off. Batches are functions of the step index, so a run is a pure
    function of its seed and settings and resumes exactly. Batches may expose a ``size`` (examples counted).
    FLOPs are counted with `flop_model` (default: counted from `model` as given, every linear layer outside
    the blocks applied at every position) on each batch's `flops.batch_tokens`.
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
        flop_model: FlopModel | None = None,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"the search needs at least one step, got {total_steps}")
        if settings.min_blocks > layout.num_blocks:
            raise ValueError(f"min_blocks={settings.min_blocks} but the model has {layout.num_blocks} blocks")
        if settings.rule == "top_k" and settings.top_k > layout.num_blocks:
            raise ValueError(f"top_k={settings.top_k} but the model has {layout.num_blocks} blocks")
        self.model, self.layout, self.loss = model, layout, loss
        self.train_batch, self.val_batch = train_batch, val_batch
        self.settings, self.total_steps, self.seed = settings, total_steps, seed
        self.identity = identity or {}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters; attach LoRA before searching")
        self.names = [n for n, _ in named]
        self.flop_model = flop_model or FlopModel.from_model(model, layout)
        self.params = [p for _, p in named]
        device = self.params[0].device
        dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.gates = BlockGates(layout.num_blocks, device=device, dtype=dtype)
        self.gates.attach(model, layout)
        self.optimizer, self.scheduler = build_optimizer(
            self.params, settings.lr, settings.weight_decay, settings.warmup_ratio, total_steps)
        self.alpha_optimizer = torch.optim.Adam([self.gates.alpha], lr=settings.alpha_lr, weight_decay=0.0)
        self.record_every = settings.record_every or max(1, math.ceil(total_steps / MAX_RECORDS))
        self.progress = SearchProgress()

    @property
    def alpha(self) -> torch.Tensor:
        return self.gates.alpha

    def _mode(self, lora: bool, gates: bool, train: bool) -> None:
        self.model.train(train)
        for p in self.params:
            p.requires_grad_(lora)
        self.gates.alpha.requires_grad_(gates)

    def _check(self, value: Any, step: int, what: str, limit: float | None = DIVERGED_LOSS) -> None:
        s = self.settings
        check_loss(value, f"search step {step} ({s.hypergradient})", what,
                   f"lower the LoRA learning rate (lr={s.lr}) or the gate learning rate (alpha_lr={s.alpha_lr}), "
                   "or search in float32 (dtype='float32') if you are using float16/bfloat16; the selection so "
                   "far is not trustworthy", limit)

    def _loss(self, batch: Any, step: int, what: str) -> torch.Tensor:
        loss = self.loss(self.model, batch)
        self._check(loss, step, what)
        return loss

    @staticmethod
    def _size(batch: Any) -> int:
        return int(getattr(batch, "size", 0) or 0)

    def lora_grad(self, batch: Any, step: int = 0) -> float:
        """Backpropagate the training loss into the LoRA weights' ``.grad`` (gates constant, dropout on)."""
        self._mode(lora=True, gates=False, train=True)
        loss = self._loss(batch, step + 1, "the training loss")
        loss.backward()
        self.progress.examples_seen += self._size(batch)
        self.progress.flops += self.flop_model.train_step(batch_tokens(batch))
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
        n = self.settings.val_batches
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
            self.progress.val_examples_seen += self._size(batch)
            self.progress.flops += self.flop_model.gate_pass(batch_tokens(batch))
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
            self.progress.val_examples_seen += self._size(batch)
            self.progress.flops += self.flop_model.train_step(batch_tokens(batch))
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
                self.progress.flops += self.flop_model.gate_pass(batch_tokens(train_batch))
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
        if self.settings.hypergradient == "first_order":
            train_loss = self.lora_step(train_batch, step)
            val_loss = self.gate_grad_first_order(val_batches, step)
        else:
            xi = self.settings.unroll_lr
            if xi is None:
                xi = self.scheduler.get_last_lr()[0]
            train_loss = self.lora_grad(train_batch, step)
            val_loss = self.gate_grad_second_order(train_batch, val_batches, xi, step)
            self._lora_update()
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        self._check(self.gates.alpha, step + 1, "alpha", limit=None)
        return train_loss, val_loss

    def current_selection(self) -> tuple[tuple[int, ...], float]:
        s = self.settings
        return select_blocks(self.gates.alpha.tolist(), s.rule, s.top_k, s.min_blocks, s.max_blocks)

    def save_state(self, directory: str | Path) -> None:
        """Write everything `resume_from` needs to continue this run exactly."""
        weights = {"lora." + n: p for n, p in zip(self.names, self.params, strict=True)}
        save_checkpoint(directory, STATE_FILE, weights={**weights, "alpha": self.gates.alpha},
                        optimizers={"optimizer": self.optimizer.state_dict(),
                                    "scheduler": self.scheduler.state_dict(),
                                    "alpha_optimizer": self.alpha_optimizer.state_dict()},
                        progress=asdict(self.progress), num_blocks=self.layout.num_blocks,
                        total_steps=self.total_steps)

    def load_state(self, directory: str | Path) -> None:
        saved = load_checkpoint(directory, STATE_FILE, "search", num_blocks=self.layout.num_blocks,
                                total_steps=self.total_steps)
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(saved["weights"]["lora." + name])
            self.gates.alpha.copy_(saved["weights"]["alpha"])
        self.optimizer.load_state_dict(saved["optimizers"]["optimizer"])
        self.scheduler.load_state_dict(saved["optimizers"]["scheduler"])
        self.alpha_optimizer.load_state_dict(saved["optimizers"]["alpha_optimizer"])
        self.progress = SearchProgress(**saved["progress"])

    def _stable_reason(self, window: int) -> str | None:
        """Record this step's alpha; say why the search may stop now (selection unchanged for `window` steps
        and alpha's ranking settled against `window` steps ago), or None."""
        p = self.progress
        p.recent_alpha.append(self.gates.alpha.tolist())
        del p.recent_alpha[: -(window + 1)]
        rho = settled_correlation(p.stable_steps, p.recent_alpha, window, self.settings.stable_rank_corr)
        if rho is None:
            return None
        return (f"stable: selection unchanged for {window} steps and alpha's rank correlation with step "
                f"{p.step - window} is {rho:.3f} (>= {self.settings.stable_rank_corr})")

    def _metrics(self, blocks: tuple[int, ...], threshold: float) -> dict[str, Any]:
        p = self.progress
        recent = p.since_report or [[math.nan, math.nan]]
        return {
            "step": p.step, "total_steps": self.total_steps,
            "search_val_loss": math.fsum(v for _, v in recent) / len(recent),
            "train_loss": math.fsum(t for t, _ in recent) / len(recent),
            "compute_s": p.compute_s, "flops": float(p.flops), "examples_seen": p.examples_seen,
            "val_examples_seen": p.val_examples_seen, "num_blocks": len(blocks), "blocks": list(blocks),
            "num_blocks_total": self.layout.num_blocks, "alpha": self.gates.alpha.tolist(),
            "gates": self.gates.values().tolist(), "threshold": threshold, "stable_steps": p.stable_steps,
            "alpha_separation": self.separation(),
        }

    def separation(self) -> float | None:
        """`stability.alpha_separation` of the current alpha after the steps done (None before the first)."""
        steps = self.progress.step
        return alpha_separation(self.gates.alpha.tolist(), steps, self.settings.alpha_lr) if steps else None

    def run(self, on_step: OnStep | None = None, resume_from: str | Path | None = None,
            verbose: bool = False) -> SelectionResult:
        """Run (or continue) the search to `total_steps` or until the selection is stable; select blocks.

        Every `report_every` steps, and at the end, calls ``on_step(metrics, save_state)``: the metrics'
        ``search_val_loss``/``train_loss`` are means over the steps since the previous report.
        """
        if resume_from is not None:
            self.load_state(resume_from)
        p, settings = self.progress, self.settings
        while p.step < self.total_steps and p.stop_reason is None:
            started = time.perf_counter()
            train_loss, val_loss = self.step(p.step)
            p.compute_s += time.perf_counter() - started
            p.step += 1
            p.train_loss_curve.append(train_loss)
            p.val_loss_curve.append(val_loss)
            p.since_report.append([train_loss, val_loss])
            blocks, threshold = self.current_selection()
            p.stable_steps = p.stable_steps + 1 if p.blocks == list(blocks) else 0
            p.blocks = list(blocks)
            if settings.stop_when_stable:
                p.stop_reason = self._stable_reason(settings.stop_when_stable)
            last = p.step == self.total_steps or p.stop_reason is not None
            if p.step % self.record_every == 0 or last:
                p.trajectory_steps.append(p.step)
                p.alpha_trajectory.append(self.gates.alpha.tolist())
            if p.step % settings.report_every == 0 or last:
                metrics = self._metrics(blocks, threshold)
                p.since_report = []
                if verbose:
                    print(f"[flexora] step {p.step}/{self.total_steps} val_loss {metrics['search_val_loss']:.4f} "
                          f"blocks {list(blocks)} ({p.compute_s:.1f}s)", flush=True)
                if on_step is not None:
                    on_step(metrics, self.save_state)
        return self.result()

    def result(self) -> SelectionResult:
        """The selection at the current alpha, with the run's history and cost."""
        p, s = self.progress, self.settings
        blocks, threshold = self.current_selection()
        return SelectionResult(
            blocks=blocks, num_blocks_total=self.layout.num_blocks, alpha=self.gates.alpha.tolist(),
            gates=self.gates.values().tolist(), rule=s.rule, threshold=threshold, hypergradient=s.hypergradient,
            seed=self.seed, steps=p.step, compute_s=p.compute_s, flops=float(p.flops), examples_seen=p.examples_seen,
            val_examples_seen=p.val_examples_seen, model=str(self.identity.get("model", "")),
            task=str(self.identity.get("task", "")),
            target_modules=tuple(self.identity.get("target_modules") or self.layout.target_modules),
            layers_pattern=self.layout.pattern, task_type=self.identity.get("task_type"),
            stop_reason=p.stop_reason or f"completed {p.step} steps", planned_steps=self.total_steps,
            trajectory_steps=list(p.trajectory_steps), alpha_trajectory=[list(a) for a in p.alpha_trajectory],
            val_loss_curve=list(p.val_loss_curve), train_loss_curve=list(p.train_loss_curve),
            settings=asdict(s), alpha_separation=self.separation(),
        )
