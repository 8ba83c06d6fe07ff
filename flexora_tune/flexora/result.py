"""What a search found and what it cost, in a form that survives JSON and exports a peft `LoraConfig`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..blocks import BlockSelection
from ..results import best_search_selection, trial_outcomes
from ..stability import alpha_separation as measure_separation


class BlockChoice:
    """What a search result and a probe result share: a choice of blocks with enough of the model's layout to
    export it as a peft `LoraConfig`, and a JSON form. Subclasses are dataclasses with the fields ``blocks``,
    ``num_blocks_total``, ``target_modules``, ``layers_pattern``, ``task_type`` and ``settings``."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def selection(self) -> BlockSelection:
        return BlockSelection(self.blocks, self.num_blocks_total)

    def to_lora_config(self, **lora_kwargs: Any):
        """A peft `LoraConfig` with LoRA on exactly the chosen blocks; rank, lora_alpha, dropout and task type
        default to the run's, any `LoraConfig` field can be overridden."""
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
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"not a {cls.__name__} JSON: {exc}") from exc


@dataclass
class SelectionResult(BlockChoice):
    """What a search found and what it cost: the kept blocks, the final alpha and gates, their history,
    the rule and threshold used, and enough of the model's layout to export a peft `LoraConfig`. It ran
    `steps` of `planned_steps` steps; `stop_reason` says why it ended there. `flops` is the search's
    compute (`flops.py`; 0 in results written before it was counted). `alpha_separation` says how far alpha
    separated (`stability.alpha_separation`: about 1 is noise, 3 or more separated); a result written before it
    was recorded gets it from its alpha, steps and ``alpha_lr`` when they are there."""

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
    flops: float = 0.0
    trajectory_steps: list[int] = field(default_factory=list)
    alpha_trajectory: list[list[float]] = field(default_factory=list)
    val_loss_curve: list[float] = field(default_factory=list)
    train_loss_curve: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    alpha_separation: float | None = None

    def __post_init__(self) -> None:
        self.blocks = BlockSelection(tuple(self.blocks), self.num_blocks_total).blocks
        self.target_modules = tuple(self.target_modules)
        self.settings = json.loads(json.dumps(self.settings))
        if len(self.alpha) != self.num_blocks_total:
            raise ValueError(f"{len(self.alpha)} alpha values for {self.num_blocks_total} blocks")
        alpha_lr = self.settings.get("alpha_lr")
        if self.alpha_separation is None and self.steps > 0 and isinstance(alpha_lr, int | float) and alpha_lr > 0:
            self.alpha_separation = measure_separation(self.alpha, self.steps, alpha_lr)

    @classmethod
    def from_analysis(cls, analysis: Any, metric: str = "val_accuracy", mode: str = "max") -> SelectionResult:
        """The search result behind a Ray Tune run (`tune.run`'s analysis or `Tuner.fit`'s result grid): the
        search whose selection's fine-tune scored best on the validation `metric`."""
        return cls.from_dict(best_search_selection(trial_outcomes(analysis), metric, mode))
