"""Fine-tuning fresh LoRA on exactly a given set of blocks, with evaluation callbacks and resumable state."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from .blocks import BlockLayout, BlockSelection, attach_lora, find_blocks
from .models import load_model, pick_device, pick_dtype
from .objective import encode, evaluate, loss_fn
from .tasks import TaskData, TaskSpec, load_task

STATE_FILE = "finetune_state.pt"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and runtime settings shared by fine-tuning and the Flexora search.

    Defaults are the method's reference: rank 8, lora_alpha 16, dropout 0, the family's query/value
    projections. `device`/`dtype` default to CUDA+bf16 when available, else CPU+float32; `threads`
    sets torch's intra-op threads (a Ray trial passes the CPUs it was given).
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check_positive(self, "r", "lora_alpha", "batch_size", "eval_batch_size")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class FinetuneSettings(LoraSettings):
    """Stage-2 training: AdamW with cosine decay and warm-up (reference: 3 epochs, lr 1e-4, 10% warm-up).

    `max_steps` caps the total steps and `max_train_examples` the training set; `eval_every` evaluates
    every N steps instead of after each epoch.
    """

    epochs: int = 3
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_steps: int | None = None
    max_train_examples: int | None = None
    eval_every: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "epochs", "lr")
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


def _check_positive(settings: Any, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def settings_from(cls: type, settings: dict[str, Any]):
    """Build a settings dataclass from keyword settings, naming any unknown key."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown} for {cls.__name__}; valid: {sorted(known)}")
    return cls(**settings)


@dataclass
class FinetuneResult:
    """What a fine-tune produced; the metric names match what the Ray Tune trainable reports."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoraSession:
    """A model with LoRA attached and everything needed to train and evaluate it on one task."""

    model: torch.nn.Module
    tokenizer: Any
    layout: BlockLayout
    selection: BlockSelection
    task: TaskData
    device: torch.device

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def evaluate(self, split: str, settings: LoraSettings) -> dict[str, float]:
        return evaluate(
            self.model, self.tokenizer, self.task.split(split), self.task.kind,
            self.task.spec.max_length, settings.eval_batch_size, self.device,
        )


def open_lora_session(
    model: str,
    task: TaskData,
    blocks: Sequence[int] | BlockSelection | None,
    settings: LoraSettings,
    seed: int,
) -> LoraSession:
    """Load the pretrained model for `task` and attach fresh, seeded LoRA to `blocks` (None: all)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    dtype = pick_dtype(device, settings.dtype)
    torch.manual_seed(seed)
    hf_model, tokenizer = load_model(
        model, task.kind, num_labels=task.num_labels if task.kind == "classification" else None,
        device=device, dtype=dtype,
    )
    layout = find_blocks(hf_model)
    if blocks is None:
        selection = BlockSelection.all(layout.num_blocks)
    elif isinstance(blocks, BlockSelection):
        if blocks.num_blocks_total != layout.num_blocks:
            raise ValueError(
                f"the selection is for {blocks.num_blocks_total} blocks but {model!r} has {layout.num_blocks}"
            )
        selection = blocks
    else:
        selection = BlockSelection(tuple(blocks), layout.num_blocks)
    targets = settings.target_modules or layout.target_modules
    unknown = sorted(set(targets) - set(layout.linear_modules))
    if unknown:
        raise ValueError(
            f"target modules {unknown} are not linear layers of {model!r}'s blocks; "
            f"choose from {list(layout.linear_modules)}"
        )
    config = selection.to_lora_config(
        layout, target_modules=targets, r=settings.r, lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout, task_type="SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM",
    )
    peft_model = attach_lora(hf_model, selection, config, layout)
    return LoraSession(peft_model, tokenizer, layout, selection, task, device)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def _check_finite(loss: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{what} became {loss.item()} at step {step}: lower the learning rate, or train in float32 "
            "(dtype='float32') if you are using float16/bfloat16"
        )


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
    `resume_from=dir` continues exactly. `compute_s` counts training and validation (what choosing a
    strategy costs); the test evaluation, a report only, is timed apart as `test_eval_s`. Same seed, same
    numbers on CPU. Keyword `settings` are the fields of `FinetuneSettings`.
    """
    config: FinetuneSettings = settings_from(FinetuneSettings, settings)
    data = task if isinstance(task, TaskData) else load_task(task)
    session = open_lora_session(model, data, blocks, config, seed)
    train = list(data.train[: config.max_train_examples] if config.max_train_examples else data.train)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = planned_steps(len(data.train), config)
    params = [p for p in session.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    state: dict[str, Any] = {"step": 0, "compute_s": 0.0, "test_eval_s": 0.0, "examples_seen": 0, "history": [],
                             "loss_sum": 0.0, "loss_count": 0}
    if resume_from is not None:
        saved = torch.load(Path(resume_from) / STATE_FILE, weights_only=False)
        session.model.load_state_dict(saved["weights"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["progress"]

    def save_state(directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in session.model.state_dict().items()
                   if k in trainable_names}
        torch.save({"weights": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "progress": dict(state)}, Path(directory) / STATE_FILE)

    trainable_names = {n for n, p in session.model.named_parameters() if p.requires_grad}
    trainable_params = session.trainable_params
    session.model.train()
    clock = time.perf_counter()
    while state["step"] < total_steps:
        step = state["step"]
        epoch, position = divmod(step, steps_per_epoch)
        order = _epoch_order(len(train), seed, epoch)
        chunk = [train[i] for i in order[position * config.batch_size : (position + 1) * config.batch_size]]
        batch = encode(chunk, session.tokenizer, data.kind, data.spec.max_length).to(session.device)
        loss = loss_fn(session.model, batch, data.kind)
        _check_finite(loss, step, "the training loss")
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["examples_seen"] += len(chunk)
        state["loss_sum"] += loss.item()
        state["loss_count"] += 1
        end_of_epoch = state["step"] % steps_per_epoch == 0
        due = (state["step"] % config.eval_every == 0) if config.eval_every else end_of_epoch
        if due or state["step"] == total_steps:
            val = session.evaluate("val", config)
            now = time.perf_counter()
            state["compute_s"] += now - clock
            test = session.evaluate("test", config)
            clock = time.perf_counter()
            state["test_eval_s"] += clock - now
            metrics = {
                "val_accuracy": val["accuracy"], "val_loss": val["loss"], "test_accuracy": test["accuracy"],
                "train_loss": state["loss_sum"] / max(1, state["loss_count"]), "step": state["step"],
                "epoch": state["step"] / steps_per_epoch, "examples_seen": state["examples_seen"],
                "compute_s": state["compute_s"], "test_eval_s": state["test_eval_s"],
                "num_blocks": len(session.selection),
                "trainable_params": trainable_params,
            }
            state["history"].append(metrics)
            state["loss_sum"], state["loss_count"] = 0.0, 0
            if verbose:
                print(f"[finetune] step {metrics['step']}/{total_steps} train_loss {metrics['train_loss']:.4f} "
                      f"val_acc {metrics['val_accuracy']:.4f} ({metrics['compute_s']:.1f}s)", flush=True)
            if on_eval is not None:
                on_eval(dict(metrics), save_state)

    last = state["history"][-1]
    return FinetuneResult(
        val_accuracy=last["val_accuracy"], test_accuracy=last["test_accuracy"], val_loss=last["val_loss"],
        train_loss=last["train_loss"], blocks=list(session.selection.blocks), num_blocks=len(session.selection),
        num_blocks_total=session.selection.num_blocks_total, trainable_params=trainable_params,
        compute_s=last["compute_s"], examples_seen=state["examples_seen"], steps=state["step"], seed=seed,
        model=model, task=data.spec.name, history=list(state["history"]),
    )
