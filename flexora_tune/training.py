"""What both stages (the Flexora search and the fine-tune) share: LoRA and runtime settings, a model with
seeded LoRA on chosen blocks, the seeded batch order, optimizer and schedule, loss checks that name the step
and the fix, and checkpoints that resume a run bit for bit."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from .blocks import BlockLayout, BlockSelection, attach_lora, find_blocks
from .flops import FlopModel, eval_flops
from .models import load_model, pick_device, pick_dtype
from .objective import evaluate
from .tasks import TaskData

#: A training loss above this has diverged: cross-entropy at chance is ln(classes) or ln(vocabulary) < 15.
DIVERGED_LOSS = 1e3


def check_positive(settings: Any, *names: str) -> None:
    """Raise ValueError naming the first of `names` whose value on `settings` is not a positive number."""
    for name in names:
        value = getattr(settings, name)
        if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
                or value <= 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def settings_from(cls: type, settings: dict[str, Any]):
    """Build a settings dataclass from keyword settings, naming any unknown key."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown} for {cls.__name__}; valid: {sorted(known)}")
    return cls(**settings)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and runtime settings shared by the fine-tune and the Flexora search (defaults: the reference)."""

    r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input, in [0, 1)."""
    target_modules: tuple[str, ...] | None = None
    """Linear layers inside each block that get LoRA; None: the family's query/value projections."""
    batch_size: int = 8
    """Training examples per optimizer step."""
    eval_batch_size: int = 32
    """Examples per forward pass when evaluating."""
    device: str | None = None
    """``cuda``, ``cpu``, ...; None: CUDA when available, else CPU."""
    dtype: str | None = None
    """``float32``, ``bfloat16`` or ``float16``; None: bf16 on CUDA, float32 on CPU."""
    threads: int | None = None
    """torch intra-op threads; a Ray trial passes the CPUs it was given (oversubscription is slow)."""
    trust_remote_code: bool = False
    """Run the Python code a model directory or hub repository ships (its config's auto_map); only for code
    you have read and trust. False: such a model fails to load, naming this setting; nothing ever prompts."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_positive(self, "r", "lora_alpha", "batch_size", "eval_batch_size")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass
class LoraSession:
    """A model with LoRA attached and everything needed to train and evaluate it on one task, and to count
    what that costs in FLOPs (`flop_model`, taken when the session opens, while LoRA and head are trainable)."""

    model: torch.nn.Module
    tokenizer: Any
    layout: BlockLayout
    selection: BlockSelection
    task: TaskData
    device: torch.device
    flop_model: FlopModel | None = None

    def __post_init__(self) -> None:
        if self.flop_model is None:
            self.flop_model = FlopModel.from_model(self.model, self.layout, self.task.kind)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def evaluate(self, split: str, settings: LoraSettings) -> dict[str, float]:
        return evaluate(
            self.model, self.tokenizer, self.task.split(split), self.task.kind,
            self.task.spec.max_length, settings.eval_batch_size, self.device,
        )

    def eval_flops(self, split: str, settings: LoraSettings) -> int:
        """The FLOPs of one `evaluate(split, settings)`: a function of the split's tokens only."""
        return eval_flops(self.flop_model, self.task.split(split), self.tokenizer, self.task.kind,
                          self.task.spec.max_length, settings.eval_batch_size)


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
        device=device, dtype=dtype, trust_remote_code=settings.trust_remote_code,
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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits `n` training examples: a pure function of seed and epoch, so
    a resumed run sees the same batches."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def epoch_batch(examples: Sequence[Any], batch_size: int, seed: int, step: int) -> list[Any]:
    """The examples of optimizer step `step` (0-based) when every epoch visits `examples` in `epoch_order`."""
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    epoch, position = divmod(step, steps_per_epoch)
    order = epoch_order(len(examples), seed, epoch)
    return [examples[i] for i in order[position * batch_size : (position + 1) * batch_size]]


def build_optimizer(
    params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float, warmup_ratio: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up over `warmup_ratio` of `total_steps`, then cosine decay (the reference's)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def check_loss(value: torch.Tensor | float, where: str, what: str, fix: str, limit: float | None = None) -> None:
    """Raise FloatingPointError when `value` (a tensor: any element) is not finite, or above `limit` (diverged),
    naming `what`, `where` (e.g. "step 5") and the `fix`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float()
        value = value.mean().item() if torch.isfinite(value).all() else math.nan
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} became {value} at {where}: {fix}")
    if limit is not None and value > limit:
        raise FloatingPointError(f"{what} diverged to {value:.4g} (above {limit:g}) at {where}: {fix}")


def save_checkpoint(directory: str | Path, file: str, *, weights: dict[str, torch.Tensor],
                    optimizers: dict[str, Any], progress: dict[str, Any], **meta: Any) -> Path:
    """Write a run's state to `directory/file`: trainable weights, optimizer and scheduler states, the
    progress record, `meta` (checked on resume) and torch's CPU and CUDA random states. Only tensors and
    plain values, so `load_checkpoint` reads it with ``weights_only=True`` (no pickled code)."""
    path = Path(directory) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
        "optimizers": optimizers, "progress": progress, "meta": meta,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }, path)
    return path


def load_checkpoint(directory: str | Path, file: str, what: str, **expected: Any) -> dict[str, Any]:
    """Read what `save_checkpoint` wrote and restore the random states; raise when the file is missing or a
    `meta` value differs from `expected` (a checkpoint of another run), naming both."""
    path = Path(directory) / file
    if not path.is_file():
        raise FileNotFoundError(f"no {what} state at {path}; pass a directory written by save_state")
    saved = torch.load(path, weights_only=True, map_location="cpu")
    for key, value in expected.items():
        if saved["meta"].get(key) != value:
            raise ValueError(f"the checkpoint at {path} has {key}={saved['meta'].get(key)!r} but this {what} has "
                             f"{key}={value!r}; resume with the same model and settings")
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return saved
