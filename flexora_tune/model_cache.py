"""The per-process cache of pristine base models, so a reused Ray worker loads each model once and every
trial still gets a clean model: its own module tree, fresh seeded weights where the checkpoint has none, and
nothing left behind by an earlier trial."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: How many pristine models a process keeps (default 1; 0 turns the model and task caches off).
CACHE_ENV = "FLEXORA_MODEL_CACHE"

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase, tuple[str, ...]]


def _modules_owning(model: PreTrainedModel, fresh: set[str]) -> list[tuple[str, PreTrainedModel]]:
    """The modules that own `fresh` tensors, with the `PreTrainedModel` whose `_init_weights` initialises each,
    in the order transformers initialises missing weights (children before their parent)."""
    found: list[tuple[str, PreTrainedModel]] = []

    def walk(module: torch.nn.Module, prefix: str, owner: PreTrainedModel) -> None:
        for child_name, child in module.named_children():
            walk(child, f"{prefix}{child_name}.", child if isinstance(child, PreTrainedModel) else owner)
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if any(prefix + n in fresh for n, _ in own):
            found.append((prefix[:-1], owner))

    walk(model, "", model)
    return found


def init_missing_weights(model: PreTrainedModel, fresh: tuple[str, ...]) -> None:
    """(Re-)draw the tensors missing from the checkpoint, the way `from_pretrained` does: the model's own
    `_init_weights`, module by module in its order, from the global CPU RNG (on a CPU copy of the module,
    whatever the model's device). Loaded and cached copies thus get the same weights for the same seed."""
    if not fresh:
        return
    wanted = set(fresh)
    guard = getattr(getattr(transformers, "initialization", None), "guard_torch_init_functions", None)
    for module_name, owner in _modules_owning(model, wanted):
        module = model.get_submodule(module_name)
        prefix = f"{module_name}." if module_name else ""
        staged = copy.deepcopy(module).to("cpu")
        targets = {}
        for name, tensor in [*staged.named_parameters(), *staged.named_buffers()]:
            is_fresh = prefix + name in wanted
            tensor._is_hf_initialized = not is_fresh  # transformers >= 5 initialises unflagged tensors only
            if is_fresh:
                targets[name] = tensor
        with torch.no_grad(), (guard() if guard else contextlib.nullcontext()):
            owner._init_weights(staged)
        own = dict([*module.named_parameters(), *module.named_buffers()])
        with torch.no_grad():
            for name, value in targets.items():
                own[name].copy_(value)


@dataclass
class CachedModel:
    """A pristine model kept by `load_model`, never handed out: callers get `copy()`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fresh: tuple[str, ...]
    versions: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model.requires_grad_(False)
        self.versions = {n: p._version for n, p in self.model.named_parameters(remove_duplicate=False)}

    def intact(self) -> bool:
        """False when a caller wrote a shared weight in place (its version counter moved)."""
        return all(p._version == self.versions[n] for n, p in self.model.named_parameters(remove_duplicate=False))

    def copy(self) -> PreTrainedModel:
        """A new module tree; pretrained parameters are new `Parameter`s on the same storage (trainable, as
        `from_pretrained` returns them), the fresh ones and all buffers are cloned."""
        memo: dict[int, Any] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if name not in self.fresh and id(param) not in memo:
                shared = torch.nn.Parameter(param.detach(), requires_grad=True)
                shared.__dict__.update(param.__dict__)
                memo[id(param)] = shared
        copied = copy.deepcopy(self.model, memo)
        params = dict(copied.named_parameters())
        for name in self.fresh:
            if name in params:
                params[name].requires_grad_(True)
        return copied

    @property
    def nbytes(self) -> int:
        return storage_bytes(self.model)


class ModelCache:
    """Pristine models by key (path, files' stamp, head, labels, device, dtype, remote-code flag), least
    recently used first out; `checkout` hands out copies and remembers them weakly, so `release_trial_memory`
    can tell whether a trial let go of its model."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, CachedModel] = OrderedDict()
        self.lock = threading.RLock()
        self.handed_out: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def checkout(self, key: tuple, load: Callable[[], Loaded], name: str) -> Loaded:
        """A copy of the model under `key` (loading it with `load` on a miss), its tokenizer and the names of
        its tensors missing from the checkpoint (for `init_missing_weights`)."""
        limit = model_cache_limit()
        if limit == 0:
            model, tokenizer, fresh = load()
            self.handed_out.add(model)
            return model, tokenizer, fresh
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and not entry.intact():
                warnings.warn(f"the cached weights of {name!r} were modified in place by an earlier caller; "
                              "reloading them", RuntimeWarning, stacklevel=3)
                del self.entries[key]
                entry = None
                free_memory()
            if entry is None:
                while len(self.entries) >= limit:
                    self.entries.popitem(last=False)
                    free_memory()
                entry = CachedModel(*load())
                self.entries[key] = entry
            self.entries.move_to_end(key)
            model = entry.copy()
        self.handed_out.add(model)
        return model, entry.tokenizer, entry.fresh

    def clear(self) -> int:
        with self.lock:
            count = len(self.entries)
            self.entries.clear()
        return count

    def nbytes(self, device: str | None = None) -> int:
        with self.lock:
            return sum(e.nbytes for key, e in self.entries.items() if device is None or key[4] == device)


MODEL_CACHE = ModelCache()


def model_cache_limit() -> int:
    """How many pristine models `load_model` keeps per process: ``FLEXORA_MODEL_CACHE`` (default 1; 0 turns
    the model and task caches off, e.g. to measure without them)."""
    value = os.environ.get(CACHE_ENV, "1").strip().lower()
    if value in ("off", "false", "no"):
        return 0
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{CACHE_ENV} must be a number of models (0 turns the cache off), got {value!r}") from None
    if limit < 0:
        raise ValueError(f"{CACHE_ENV} must be >= 0, got {limit}")
    return limit


def release_cached_models() -> int:
    """Drop every cached pristine model (and the task cache) and return their memory to the system (CUDA
    included); returns how many models were dropped. Copies still in use keep their weights alive."""
    from .tasks import clear_task_cache

    count = MODEL_CACHE.clear()
    clear_task_cache()
    free_memory()
    return count


def release_trial_memory() -> int:
    """Call when a trial ends, after its model, optimizer and tensors went out of scope, so that between trials a
    reused worker holds only its cached models (`cached_model_bytes`; on CUDA, `torch.cuda.memory_allocated`).

    A trial's model is freed by reference counting as soon as nothing refers to it; this collects the young
    garbage, and everything (a full collection, a few hundred ms in a process with torch loaded) only when a
    model copy is still alive; then it hands CUDA's free blocks back to the device. Returns how many copies
    handed out by `load_model` are still referenced (0 once the trial let go of its model)."""
    gc.collect(1)
    if len(MODEL_CACHE.handed_out):
        gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return len(MODEL_CACHE.handed_out)


def cached_model_bytes(device: torch.device | str | None = None) -> int:
    """Bytes held by the cached pristine models (all of them, or those on `device`)."""
    return MODEL_CACHE.nbytes(None if device is None else str(normalise_device(device)))


def storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def free_memory() -> None:
    """Collect garbage and hand CUDA's cached blocks back to the device."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def normalise_device(device: torch.device | str) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device), so one device has one cache key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def model_stamp(path: str) -> tuple:
    """What changes when a local model directory is rewritten (file names, sizes, mtimes); () for hub ids."""
    directory = Path(path)
    if not directory.is_dir():
        return ()
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir() if f.is_file()))
