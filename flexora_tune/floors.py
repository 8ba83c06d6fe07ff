"""Floors: what a comparison's strategies must beat before their differences mean anything.

- ``majority-class``: always predict the most frequent label of the training examples the fine-tunes see. Its
  loss, for a classification head, is the cross-entropy of the training label frequencies (add-one smoothed),
  the best a constant prediction scores. For a causal-LM task the "label" is the answer's position among its
  choices, which is the answer itself when every example has the same choices (the usual case).
- ``no-fine-tune``: the pretrained model with no LoRA, scoring the choices zero-shot as `objective.evaluate`
  does. Causal-LM tasks only: a classification head is new and untrained, so without fine-tuning it is noise.

Both are measured on the ``val`` and ``test`` splits. Neither depends on the trial seed: the splits are fixed by
the task's `split_seed` and neither floor trains, so one value holds for every seed of a comparison.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .results import (
    FLOORS_FILE,
    MAJORITY_CLASS,
    NO_FINE_TUNE,
    TEST_ACCURACY,
    TEST_LOSS,
    VAL_ACCURACY,
    VAL_LOSS,
)
from .tasks import Example, TaskData, TaskSpec, load_task

#: The splits a floor is measured on, and the metric keys of each.
FLOOR_SPLITS: dict[str, tuple[str, str]] = {"val": (VAL_ACCURACY, VAL_LOSS), "test": (TEST_ACCURACY, TEST_LOSS)}
NO_HEAD_NOTE = "does not apply to a classification head (new and untrained, it is noise without fine-tuning)"
SEEDS_NOTE = "the same for every seed (the task's split_seed fixes the splits, and neither floor trains)"


@dataclass(frozen=True)
class Floor:
    """One floor: whether it applies to the task, its value per metric key (``val_accuracy``, ``test_accuracy``,
    and the losses where defined) and a note that says what it is."""

    name: str
    applies: bool
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def value(self, metric: str) -> float | None:
        """The floor's value of `metric`, or None when it has none (or does not apply)."""
        value = self.values.get(metric)
        return float(value) if self.applies and isinstance(value, int | float) and math.isfinite(value) else None


@dataclass(frozen=True)
class Floors:
    """A comparison's floors (``floors.json``) and what they were measured on."""

    task: str
    kind: str
    split_seed: int
    train_examples: int
    split_sizes: dict[str, int]
    floors: tuple[Floor, ...]
    seeds: str = SEEDS_NOTE

    def get(self, name: str) -> Floor | None:
        return next((f for f in self.floors if f.name == name), None)

    @property
    def majority(self) -> Floor | None:
        return self.get(MAJORITY_CLASS)

    def values(self, metric: str) -> dict[str, float]:
        """Floor name -> value of `metric`, for the floors that have one (what the best-so-far plot draws)."""
        found = {f.name: f.value(metric) for f in self.floors}
        return {name: value for name, value in found.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["floors"] = [{**asdict(f), "values": {k: _finite(v) for k, v in f.values.items()}} for f in self.floors]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Floors:
        floors = tuple(Floor(str(f["name"]), bool(f.get("applies", True)),
                             {k: float(v) for k, v in (f.get("values") or {}).items() if v is not None},
                             str(f.get("note", ""))) for f in data.get("floors", ()))
        return cls(str(data.get("task", "")), str(data.get("kind", "")), int(data.get("split_seed", 0)),
                   int(data.get("train_examples", 0)), dict(data.get("split_sizes") or {}), floors,
                   str(data.get("seeds", SEEDS_NOTE)))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _train(task: TaskData, max_train_examples: int | None) -> tuple[Example, ...]:
    """The training examples a fine-tune sees: the first `max_train_examples` of the split, like `finetune`."""
    return task.train[:max_train_examples] if max_train_examples else task.train


def _label_name(task: TaskData, train: Sequence[Example], label: int) -> str:
    if task.kind == "classification":
        return task.label_names[label]
    shared = {ex.choices for ex in train}
    if len(shared) == 1 and (choices := next(iter(shared))) and label < len(choices):
        return choices[label].strip()
    return f"choice {label + 1}"


def majority_class_floor(task: TaskData, max_train_examples: int | None = None) -> Floor:
    """Accuracy on ``val`` and ``test`` of always predicting the most frequent training label (ties: the first
    label), and, for a classification head, the cross-entropy of the training label frequencies."""
    train = _train(task, max_train_examples)
    counts = Counter(ex.label for ex in train)
    label = min(counts, key=lambda c: (-counts[c], c))
    prior = {c: (counts[c] + 1) / (len(train) + task.num_labels) for c in range(task.num_labels)}
    values: dict[str, float] = {}
    for split, (accuracy, loss) in FLOOR_SPLITS.items():
        examples = task.split(split)
        values[accuracy] = sum(ex.label == label for ex in examples) / len(examples) if examples else math.nan
        if task.kind == "classification" and examples:
            values[loss] = -sum(math.log(prior[ex.label]) for ex in examples) / len(examples)
    name = _label_name(task, train, label)
    note = f"always {name!r}, the most frequent training label ({counts[label]} of {len(train)} examples)"
    return Floor(MAJORITY_CLASS, True, values, note)


def _driver_device(requested: str | None) -> tuple[Any, bool]:
    """The device of `requested` when this machine has it, else the best one it has (a cluster's driver may have
    no GPU although its trials do), and whether it fell back."""
    import torch

    from .models import pick_device

    device = pick_device(requested)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    return (device, False) if available.get(device.type, True) else (pick_device(None), True)


def no_fine_tune_floor(model: str, task: TaskData, settings: Mapping[str, Any] | None = None,
                       **loader: Any) -> Floor:
    """Zero-shot accuracy and loss of the pretrained `model` on ``val`` and ``test`` (causal-LM tasks: choices
    scored as `objective.evaluate` scores them); for a classification head, a floor that does not apply.
    `settings` may give ``device``, ``dtype`` and ``eval_batch_size``; `loader` goes to `models.load_model`."""
    if task.kind == "classification":
        return Floor(NO_FINE_TUNE, False, {}, NO_HEAD_NOTE)
    from .models import load_model, pick_dtype
    from .objective import evaluate

    settings = settings or {}
    device, fell_back = _driver_device(settings.get("device"))
    dtype = pick_dtype(device, None if fell_back else settings.get("dtype"))
    hf_model, tokenizer = load_model(model, "causal_lm", device=device, dtype=dtype, **loader)
    values: dict[str, float] = {}
    for split, (accuracy, loss) in FLOOR_SPLITS.items():
        scores = evaluate(hf_model, tokenizer, task.split(split), "causal_lm", task.spec.max_length,
                          int(settings.get("eval_batch_size") or 32), device)
        values.update({accuracy: scores["accuracy"], loss: scores["loss"]})
    return Floor(NO_FINE_TUNE, True, values, "the pretrained model without LoRA, choices scored zero-shot")


def _flat(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """A comparison's trial settings with the fine-tune's nested ones on top (what a fine-tune trial uses)."""
    settings = dict(settings or {})
    nested = settings.pop("finetune", None)
    settings.pop("search", None)
    return {**settings, **(nested if isinstance(nested, Mapping) else {})}


def compute_floors(model: str, task: str | Mapping[str, Any] | TaskSpec | TaskData,
                   settings: Mapping[str, Any] | None = None, verbose: bool = False, **loader: Any) -> Floors:
    """Both floors of `model` on `task` with a comparison's trial `settings` (``max_train_examples`` limits the
    training examples the majority is counted on; ``device``, ``dtype`` and ``eval_batch_size`` the zero-shot
    run). Counting labels is instant; a causal-LM task adds one evaluation of the pretrained model on ``val``
    and ``test``, as much as one fine-tune trial spends on its final evaluation. A zero-shot run that fails
    (out of memory, say) leaves that floor unmeasured, saying why, rather than stopping a comparison."""
    data = task if isinstance(task, TaskData) else load_task(task)
    flat = _flat(settings)
    train = _train(data, flat.get("max_train_examples"))
    sizes = {split: len(data.split(split)) for split in FLOOR_SPLITS}
    if verbose and data.kind == "causal_lm":
        print(f"[floors] scoring the pretrained model zero-shot on {sum(sizes.values())} val and test examples",
              flush=True)
    try:
        zero_shot = no_fine_tune_floor(model, data, flat, **loader)
    except (RuntimeError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        zero_shot = Floor(NO_FINE_TUNE, False, {}, f"not measured: {reason}")
    return Floors(data.spec.name, data.kind, data.spec.split_seed, len(train), sizes,
                  (majority_class_floor(data, flat.get("max_train_examples")), zero_shot))


def floors_line(floors: Floors) -> str:
    """One line with every floor's validation and test accuracy (or why it does not apply)."""
    parts = []
    for floor in floors.floors:
        if floor.applies:
            val, test = floor.value(VAL_ACCURACY), floor.value(TEST_ACCURACY)
            shown = " ".join(f"{s} {v:.3f}" for s, v in (("val", val), ("test", test)) if v is not None)
            parts.append(f"{floor.name} {shown}, {floor.note}")
        else:
            parts.append(f"{floor.name} {floor.note}")
    return "floors: " + "; ".join(parts)


def write_floors(out: str | Path, model: str, task: str | Mapping[str, Any], settings: Mapping[str, Any] | None = None,
                 reuse: bool = False, **loader: Any) -> Floors:
    """Compute the floors and write them to ``out/floors.json`` (with `reuse`, read back the ones already there:
    a resumed comparison has the same model, task and settings). Drops the models this process cached for the
    zero-shot run: a comparison's driver needs none of them while its trials run."""
    path = Path(out) / FLOORS_FILE
    existing = read_floors(out) if reuse else None
    if existing is not None:
        return existing
    floors = compute_floors(model, task, settings, verbose=True, **loader)
    path.write_text(json.dumps(floors.to_dict(), indent=2) + "\n")
    if floors.kind == "causal_lm":
        from .model_cache import release_cached_models

        release_cached_models()
    print(f"[floors] {floors_line(floors)}", flush=True)
    return floors


def read_floors(out: str | Path) -> Floors | None:
    """The floors in ``out/floors.json``, or None when the folder has none (a comparison from before floors)."""
    path = Path(out) / FLOORS_FILE
    if not path.is_file():
        return None
    try:
        return Floors.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} is not a floors file ({exc}); delete it or rerun the comparison") from exc


def majority_line(task: str | Mapping[str, Any] | TaskSpec | TaskData, accuracy: float | None = None,
                  max_train_examples: int | None = None) -> str:
    """What `finetune` and `search` print: the majority-class rate of the task's validation split and, given the
    run's validation `accuracy`, whether it beats that rate."""
    data = task if isinstance(task, TaskData) else load_task(task)
    floor = majority_class_floor(data, max_train_examples)
    rate = floor.value(VAL_ACCURACY)
    if rate is None:
        return "majority class on the validation split: none (the split is empty)"
    line = f"majority class on the validation split: {rate:.3f}, {floor.note}"
    if accuracy is None:
        return f"{line}: a fine-tune's val_accuracy must beat it to have learned anything"
    if accuracy > rate:
        return f"{line}; val_accuracy {accuracy:.3f} beats it by {accuracy - rate:.3f}"
    return (f"{line}; val_accuracy {accuracy:.3f} does not beat it: nothing was learned beyond the label frequencies "
            f"({improvement_hint()})")


def improvement_hint() -> str:
    """What usually lifts a fine-tune above its floors."""
    return ("what usually helps: more training examples, longer inputs (--max-length), more epochs (--epochs) or "
            "a higher learning rate (--lr)")
