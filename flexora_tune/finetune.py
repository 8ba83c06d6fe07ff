"""Stage 2: fine-tune fresh LoRA on exactly a given set of blocks, with evaluation callbacks and resumable
state (the shared training core is `training.py`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .blocks import BlockSelection
from .flops import batch_tokens
from .objective import encode, loss_fn
from .tasks import TaskData, TaskSpec, load_task
from .training import (
    DIVERGED_LOSS,
    LoraSession,
    LoraSettings,
    build_optimizer,
    check_loss,
    check_positive,
    epoch_batch,
    load_checkpoint,
    open_lora_session,
    save_checkpoint,
    settings_from,
)

__all__ = ["FinetuneResult", "FinetuneSettings", "LoraSession", "LoraSettings", "finetune", "finetune_flops",
           "open_lora_session", "planned_steps", "settings_from"]

STATE_FILE = "finetune_state.pt"


@dataclass(frozen=True)
class FinetuneSettings(LoraSettings):
    """Stage-2 training: AdamW with cosine decay after a linear warm-up (the reference: 3 epochs, lr 1e-4,
    10% warm-up)."""

    epochs: int = 3
    """Passes over the training set."""
    lr: float = 1e-4
    """Peak learning rate of the LoRA weights (and the classification head)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming the learning rate up, in [0, 1)."""
    max_steps: int | None = None
    """Cap on the optimizer steps; None: every step of `epochs` epochs."""
    max_train_examples: int | None = None
    """Train on the first N training examples only; None: all of them."""
    eval_every: int | None = None
    """Evaluate every N steps; None: after each epoch (and always after the last step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "epochs", "lr")
        if not 0 <= self.weight_decay or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("max_steps", "max_train_examples", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")


def planned_steps(train_size: int, settings: FinetuneSettings) -> int:
    """The optimizer steps `finetune` runs on a training set of `train_size` examples."""
    n = min(train_size, settings.max_train_examples) if settings.max_train_examples else train_size
    total = settings.epochs * math.ceil(n / settings.batch_size)
    return min(total, settings.max_steps) if settings.max_steps else total


def evaluation_due(step: int, steps_per_epoch: int, total_steps: int, settings: FinetuneSettings) -> bool:
    """Whether `finetune` evaluates after optimizer step `step` (1-based): every `eval_every` steps, else at
    each epoch's end, and always after the last step."""
    due = step % settings.eval_every == 0 if settings.eval_every else step % steps_per_epoch == 0
    return due or step == total_steps


@dataclass
class FinetuneResult:
    """What a fine-tune produced; the metric names match what the Ray Tune trainable reports. `flops` counts
    training and validation like `compute_s`; `test_eval_flops` the test evaluations (see `flops.py`)."""

    val_accuracy: float
    test_accuracy: float
    val_loss: float
    train_loss: float
    blocks: list[int]
    num_blocks: int
    num_blocks_total: int
    trainable_params: int
    compute_s: float
    examples_seen: int
    steps: int
    seed: int
    model: str
    task: str
    history: list[dict[str, float]] = field(default_factory=list)
    flops: float = 0.0
    test_eval_flops: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneProgress:
    """Where a fine-tune stands; saved with every checkpoint and restored on resume."""

    step: int = 0
    compute_s: float = 0.0
    test_eval_s: float = 0.0
    examples_seen: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    flops: int = 0
    """Training and validation-evaluation FLOPs so far (exact integers, so a resumed run continues the count)."""
    test_eval_flops: int = 0


LOSS_FIX = "lower the learning rate, or train in float32 (dtype='float32') if you are using float16/bfloat16"


def finetune(
    model: str = "default",
    task: str | dict | TaskSpec | TaskData = "default",
    blocks: Sequence[int] | BlockSelection | None = None,
    seed: int = 0,
    *,
    on_eval: Callable[[dict[str, Any], Callable[[str | Path], None]], None] | None = None,
    resume_from: str | Path | None = None,
    verbose: bool = False,
    **settings: Any,
) -> FinetuneResult:
    """Fine-tune fresh LoRA on exactly `blocks` (None: every block) of `model` for `task`.

    After each epoch (or every `eval_every` steps) it evaluates on the validation and test splits and
    calls ``on_eval(metrics, save_state)``; `save_state(dir)` writes a resumable checkpoint that
    `resume_from=dir` continues bit for bit. `compute_s` counts training and validation (what choosing a
    strategy costs); the test evaluation, a report only, is timed apart as `test_eval_s`. `flops` and
    `test_eval_flops` count the same two parts in FLOPs (`flops.py`: from the batches' tokens and the
    model's parameter counts, so the same on any machine and under any load). Same seed, same
    numbers on CPU. Keyword `settings` are the fields of `FinetuneSettings`. Raises FloatingPointError,
    naming the step, when the training loss stops being finite or diverges.
    """
    config: FinetuneSettings = settings_from(FinetuneSettings, settings)
    data = task if isinstance(task, TaskData) else load_task(task)
    session = open_lora_session(model, data, blocks, config, seed)
    train = list(data.train[: config.max_train_examples] if config.max_train_examples else data.train)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = planned_steps(len(data.train), config)
    named = {n: p for n, p in session.model.named_parameters() if p.requires_grad}
    optimizer, scheduler = build_optimizer(list(named.values()), config.lr, config.weight_decay,
                                           config.warmup_ratio, total_steps)
    identity = {"blocks": list(session.selection.blocks), "num_blocks_total": session.selection.num_blocks_total,
                "total_steps": total_steps, "seed": seed}
    progress = FinetuneProgress()
    if resume_from is not None:
        saved = load_checkpoint(resume_from, STATE_FILE, "fine-tune", **identity)
        session.model.load_state_dict(saved["weights"], strict=False)
        optimizer.load_state_dict(saved["optimizers"]["optimizer"])
        scheduler.load_state_dict(saved["optimizers"]["scheduler"])
        progress = FinetuneProgress(**saved["progress"])

    def save_state(directory: str | Path) -> None:
        save_checkpoint(directory, STATE_FILE, weights=named, progress=asdict(progress),
                        optimizers={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                        **identity)

    trainable_params = session.trainable_params
    flop_model = session.flop_model
    val_flops, test_flops = session.eval_flops("val", config), session.eval_flops("test", config)
    session.model.train()
    clock = time.perf_counter()
    while progress.step < total_steps:
        chunk = epoch_batch(train, config.batch_size, seed, progress.step)
        encoded = encode(chunk, session.tokenizer, data.kind, data.spec.max_length)
        batch = encoded.to(session.device)
        loss = loss_fn(session.model, batch, data.kind)
        check_loss(loss, f"step {progress.step + 1}", "the training loss", LOSS_FIX, DIVERGED_LOSS)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.examples_seen += len(chunk)
        progress.flops += flop_model.train_step(batch_tokens(encoded))
        progress.loss_sum += loss.item()
        progress.loss_count += 1
        if evaluation_due(progress.step, steps_per_epoch, total_steps, config):
            val = session.evaluate("val", config)
            check_loss(val["loss"], f"step {progress.step} (validation)", "the validation loss", LOSS_FIX,
                       DIVERGED_LOSS)
            now = time.perf_counter()
            progress.compute_s += now - clock
            progress.flops += val_flops
            test = session.evaluate("test", config)
            clock = time.perf_counter()
            progress.test_eval_s += clock - now
            progress.test_eval_flops += test_flops
            metrics = {
                "val_accuracy": val["accuracy"], "val_loss": val["loss"], "test_accuracy": test["accuracy"],
                "train_loss": progress.loss_sum / max(1, progress.loss_count), "step": progress.step,
                "epoch": progress.step / steps_per_epoch, "examples_seen": progress.examples_seen,
                "compute_s": progress.compute_s, "test_eval_s": progress.test_eval_s,
                "flops": float(progress.flops), "test_eval_flops": float(progress.test_eval_flops),
                "num_blocks": len(session.selection), "trainable_params": trainable_params,
            }
            progress.history.append(metrics)
            progress.loss_sum, progress.loss_count = 0.0, 0
            if verbose:
                print(f"[finetune] step {metrics['step']}/{total_steps} train_loss {metrics['train_loss']:.4f} "
                      f"val_acc {metrics['val_accuracy']:.4f} ({metrics['compute_s']:.1f}s)", flush=True)
            if on_eval is not None:
                on_eval(dict(metrics), save_state)

    last = progress.history[-1]
    return FinetuneResult(
        val_accuracy=last["val_accuracy"], test_accuracy=last["test_accuracy"], val_loss=last["val_loss"],
        train_loss=last["train_loss"], blocks=list(session.selection.blocks), num_blocks=len(session.selection),
        num_blocks_total=session.selection.num_blocks_total, trainable_params=trainable_params,
        compute_s=last["compute_s"], examples_seen=progress.examples_seen, steps=progress.step, seed=seed,
        model=model, task=data.spec.name, history=list(progress.history),
        flops=float(progress.flops), test_eval_flops=float(progress.test_eval_flops),
    )


def finetune_flops(
    model: str = "default",
    task: str | dict | TaskSpec | TaskData = "default",
    blocks: Sequence[int] | BlockSelection | None = None,
    seed: int = 0,
    **settings: Any,
) -> float:
    """The `flops` that `finetune` with the same arguments reports at its end, without training: the model
    is loaded (on the CPU) for its parameter counts and every planned batch is tokenized, nothing runs. The
    size of one fine-tune before any trial ran, e.g. of the all-blocks fine-tune that budgets are measured
    in. Torch's global random state is left as it was."""
    config: FinetuneSettings = replace(settings_from(FinetuneSettings, settings), device="cpu", dtype="float32")
    data = task if isinstance(task, TaskData) else load_task(task)
    with torch.random.fork_rng(devices=[]):
        session = open_lora_session(model, data, blocks, config, seed)
    train = list(data.train[: config.max_train_examples] if config.max_train_examples else data.train)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = planned_steps(len(data.train), config)
    val_flops = session.eval_flops("val", config)
    total = 0
    for step in range(total_steps):
        chunk = epoch_batch(train, config.batch_size, seed, step)
        total += session.flop_model.train_step(batch_tokens(encode(chunk, session.tokenizer, data.kind,
                                                                   data.spec.max_length)))
        if evaluation_due(step + 1, steps_per_epoch, total_steps, config):
            total += val_flops
    return float(total)
