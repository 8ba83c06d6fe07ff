"""Stage-1 settings: every knob of the Flexora search, one documented field at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..training import LoraSettings, check_positive

HYPERGRADIENTS = ("first_order", "second_order")
RULES = ("mean", "top_k")


@dataclass(frozen=True)
class SearchSettings(LoraSettings):
    """Stage-1 settings. Defaults follow the reference, scaled to the task and to the fine-tune that follows
    (see `default_search_steps`)."""

    steps: int | None = None
    """Alternating LoRA + gate steps; None: the reference's share of the following fine-tune (one pass over
    the search set, shortened as much as a ``max_steps`` cap shortens the fine-tune)."""
    search_train_size: int | None = None
    """The search trains LoRA on the first N training examples; None: up to 5,000, never more than the
    fine-tune trains on."""
    val_batches: int = 1
    """Search-validation batches whose loss each gate step accumulates."""
    val_batch_size: int | None = None
    """Examples per search-validation batch; None: `batch_size`."""
    search_max_length: int | None = None
    """Token limit of search sequences (a cheaper search); None: the task's ``max_length``."""
    lr: float = 1e-4
    """Peak learning rate of the LoRA weights (AdamW, cosine decay after `warmup_ratio`)."""
    alpha_lr: float = 0.01
    """Learning rate of the gate logits alpha (Adam, constant, no decay)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the LoRA weights."""
    warmup_ratio: float = 0.0
    """Share of the steps spent warming the LoRA learning rate up, in [0, 1)."""
    hypergradient: str = "first_order"
    """``first_order`` (the reference) or ``second_order`` (DARTS one-step unrolled)."""
    unroll_lr: float | None = None
    """Virtual step size of the second-order unroll; None: the current LoRA learning rate."""
    rule: str = "mean"
    """``mean`` keeps blocks with alpha above the mean (gate above 1); ``top_k`` keeps the `top_k` largest."""
    top_k: int | None = None
    """Blocks the ``top_k`` rule keeps (required by that rule, ignored by ``mean``)."""
    min_blocks: int = 1
    """The selection keeps at least this many blocks (taken by alpha)."""
    max_blocks: int | None = None
    """The selection keeps at most this many blocks (dropped by alpha); None: no cap."""
    report_every: int = 10
    """`on_step` is called every N steps (and at the end)."""
    record_every: int | None = None
    """Alpha is recorded every N steps; None: every step, thinned to at most 1,000 records."""
    stop_when_stable: int | None = 4
    """End once the selection has not changed for N steps and alpha's ranking has settled; None: run every
    step (benchmarks/results/search_budget.md: what it saves)."""
    stable_rank_corr: float = 0.9
    """Alpha has settled when its Spearman correlation with alpha `stop_when_stable` steps earlier is at
    least this."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "val_batches", "lr", "alpha_lr", "min_blocks", "report_every")
        for name in ("steps", "search_train_size", "val_batch_size", "search_max_length", "top_k", "max_blocks",
                     "record_every", "stop_when_stable", "unroll_lr"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        if not 0 <= self.weight_decay or not math.isfinite(self.weight_decay):
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
