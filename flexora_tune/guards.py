"""Checks that run before any compute is spent, and safeguards for the results they protect: command-line
values with the option's bound in the message, device strings, a Ray address that answers, trial settings
built once before Ray starts, one writer per results folder, a `--resume` that only continues the same
comparison, and trial errors shortened to one readable line. (Output paths: `files`.)

Imports neither torch nor Ray at module level (both load on first use), so the CLI stays quick to fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: The lock file a running `compare` holds in its results folder.
LOCK_FILE = ".compare.lock"
#: Keys every meta.json written by `compare` has; a folder without them holds no comparison to resume.
COMPARE_META_KEYS = frozenset({"model", "task", "metric", "strategies", "seeds", "trials", "settings",
                               "num_blocks_total"})
#: meta.json keys that may differ between a run and its resume (how it was started, not what it computes).
RESUME_FREE_KEYS = ("command",)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, else a message naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def number(text: str, *, zero: bool = False) -> float:
    """An argparse type: a finite number > 0 (>= 0 with `zero`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>= 0' if zero else '> 0'}, got {text}")
    return value


def device_option(text: str) -> str:
    """An argparse type: a device string this package trains on (see `check_device`)."""
    try:
        check_device(text, "device")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class ResultsBusyError(RuntimeError):
    """Another comparison holds the results folder's lock."""


class ResumeError(ValueError):
    """`--resume` on a folder that holds no earlier comparison, or a different one."""


def check_device(device: str | None, option: str = "device") -> None:
    """Raise ValueError naming `option` when `device` is not a torch device string of a type this package
    trains on (cpu, cuda, cuda:N, mps). None (the default device) passes."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in DEVICE_TYPES:
        raise ValueError(f"{option} {device!r} is not a device this package trains on; use cpu, cuda, cuda:N or "
                         "mps (or leave it out: CUDA when available, else the CPU)")


def check_local_device(device: str | None, option: str = "--device") -> None:
    """`check_device`, and that the device exists on this machine (a run here, not a Ray trial elsewhere)."""
    check_device(device, option)
    if device is None:
        return
    import torch

    parsed = torch.device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no usable GPU"
            raise ValueError(f"{option} {device}: CUDA is not available here (torch {torch.__version__}, {build}); "
                             "use --device cpu, or install torch's CUDA build on a machine with a GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {device}: MPS is not available here; use --device cpu")


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError, naming the address and the fix, when nothing answers at a ``host:port`` or
    ``ray://host:port`` address (``ray.init`` would retry for minutes). ``auto``/``local``/None pass."""
    if not address or address in ("auto", "local"):
        return
    match = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)/?", address.strip())
    if match is None:
        raise ValueError(f"--address {address!r} is not a Ray address; use auto, host:port or ray://host:port")
    try:
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"cannot reach the Ray cluster at --address {address} ({exc.strerror or exc}); start it there with "
            "`ray start --head`, check the host and port, or leave --address out to run on this machine"
        ) from None


@contextlib.contextmanager
def results_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `folder`'s lock file for the whole block; raise `ResultsBusyError` at once when another process
    holds it (a second `compare` on the same results folder). The OS releases it if the holder dies."""
    from filelock import FileLock, Timeout

    path = Path(folder) / LOCK_FILE
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ResultsBusyError(f"another `flexora-tune compare` is writing to {folder} (it holds {path}); wait for "
                               "it to finish, or give this run another --out") from None
    try:
        yield path
    finally:
        lock.release()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def meta_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: <saved> there, <now> now"`` for each (dotted, e.g. ``settings.max_steps``) key whose value
    differs between two meta.json contents, ignoring `RESUME_FREE_KEYS`."""
    now = json.loads(json.dumps(now, default=str))
    a, b = (_flatten({k: v for k, v in m.items() if k not in RESUME_FREE_KEYS}) for m in (saved, now))
    missing = "(not set)"
    return [f"{key}: {json.dumps(a.get(key, missing))} there, {json.dumps(b.get(key, missing))} now"
            for key in sorted(set(a) | set(b)) if a.get(key, missing) != b.get(key, missing)]


def read_compare_meta(folder: Path, meta_file: str) -> dict[str, Any] | None:
    """The meta.json a `compare` wrote in `folder`, or None when there is none (missing, unreadable, or a file
    of another origin without compare's keys)."""
    path = folder / meta_file
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and COMPARE_META_KEYS <= set(meta) else None


def has_progress(folder: Path, storage: str, experiments: Iterable[str], done_file: str) -> bool:
    """Whether a comparison in `folder` finished an experiment or saved a Tune experiment state under `storage`
    (what `--resume` continues)."""
    if (folder / done_file).is_file():
        return True
    from ray.tune import Tuner

    return any(Tuner.can_restore(f"{storage}/{name}") for name in experiments)


def check_resume(folder: Path, storage: str, experiments: Iterable[str], meta: Mapping[str, Any], meta_file: str,
                 done_file: str) -> str | None:
    """Raise `ResumeError` when `folder` holds files but no comparison (no meta.json written by `compare`), or
    a comparison with another configuration than this run's `meta` (naming each differing key). Reads only.

    A folder that is missing or empty, or that holds this very comparison before any experiment saved its
    state, has nothing to lose: resuming starts it (a job that always passes --resume works on its first run
    and after a crash at start-up); the line to print says so. None when there is progress to continue."""
    saved = read_compare_meta(folder, meta_file)
    if saved is None:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != LOCK_FILE)
        if files:
            raise ResumeError(f"cannot resume: {folder} holds no earlier comparison (no {meta_file} written by "
                              f"`flexora-tune compare`) but other files ({', '.join(files[:4])}"
                              f"{', ...' if len(files) > 4 else ''}); give this run another --out")
        return f"nothing to resume in {folder} yet; starting the comparison"
    differences = meta_differences(saved, meta)
    if differences:
        raise ResumeError(f"cannot resume {folder}: its comparison was run with another configuration ("
                          + "; ".join(differences) + "). Resume with the options it was started with (see "
                          f"{folder / meta_file}), or give this run another --out")
    if not has_progress(folder, storage, experiments, done_file):
        return f"{folder} holds this comparison but no finished experiment or Tune state yet; starting it"
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_HEADER = re.compile(r"^ray::\S+\s*\(pid=.*\)$")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b[^:]*):\s*(.+)$")


def error_line(error: BaseException | str | None, limit: int = 300) -> str:
    """One readable line for a trial's error: ``"FloatingPointError: the training loss ..."``, without Ray's
    ``ray::ImplicitFunc.train() (pid=...)`` header, traceback or colour codes; ``""`` for no error."""
    if error is None or error == "":
        return ""
    cause = getattr(error, "cause", None)  # a RayTaskError carries the trial's own exception
    if isinstance(cause, BaseException):
        error = cause
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    lines = [line for line in lines if not _RAY_HEADER.match(line)]
    if isinstance(error, BaseException) and not type(error).__module__.startswith("ray."):
        text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    else:  # Ray's wrapper or a saved string: the last "SomeError: message" line of its traceback
        found = [m for m in map(_ERROR_LINE.match, lines) if m]
        if found:
            text = f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2)}"
        else:
            text = lines[0] if lines else type(error).__name__
    return text[:limit]


def loader_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the model loaders: ``trust_remote_code=True`` only when `settings` ask for it (the
    loaders default to False, so a model's own Python code never runs and nothing prompts)."""
    return {"trust_remote_code": True} if settings.get("trust_remote_code") else {}


def absolute_model(model: str) -> str:
    """A local model directory as an absolute path (a Ray trial runs in its own working directory, where a
    relative one is not found); embedded names and hub ids unchanged."""
    from .models import EMBEDDED_MODELS

    path = Path(model).expanduser()
    return str(path.absolute()) if model not in EMBEDDED_MODELS and path.is_dir() else model


def absolute_task(task: str | Mapping[str, Any]) -> str | Mapping[str, Any]:
    """`task` with a local dataset file's path made absolute (see `absolute_model`)."""
    source = task.get("source", "default") if isinstance(task, Mapping) else task
    if not isinstance(source, str) or not source.lower().endswith((".csv", ".jsonl", ".json")):
        return task
    path = Path(source).expanduser()
    if not path.is_file():
        return task
    return {**task, "source": str(path.absolute())} if isinstance(task, Mapping) else str(path.absolute())


def check_trial_settings(base: Mapping[str, Any], num_blocks: int, *, gpus_per_trial: float = 0,
                         k: int | None = None) -> None:
    """Build both stages' settings from the trial config `base`, the task and the model's tokenizer once, so
    that a bad value fails before Ray starts, naming it, instead of failing (and being retried) in every trial.
    A CUDA device needs `gpus_per_trial` > 0; `k` (blocks of the k-rules) must fit the model's `num_blocks`."""
    from .finetune import FinetuneSettings, settings_from
    from .flexora import SearchSettings
    from .models import load_tokenizer
    from .tasks import load_task
    from .tune_trainable import parse_config

    checked = []
    for stage, cls in (("finetune", FinetuneSettings), ("search", SearchSettings)):
        trial = parse_config({**base, "stage": stage}, num_blocks=num_blocks)  # names unknown keys
        try:
            checked.append(settings_from(cls, dict(trial.settings)))
        except ValueError as exc:
            raise ValueError(f"bad {stage} setting: {exc}") from None
    for settings in checked:
        check_device(settings.device, "device")
        if settings.device and settings.device.startswith("cuda") and not gpus_per_trial:
            raise ValueError(f"device {settings.device!r} needs gpus_per_trial > 0 (--gpus-per-trial): Ray reserves "
                             "a GPU only for trials that ask for one; set it (e.g. 1, or 0.5 to share a GPU), or "
                             "leave the device out (trials use the GPU Ray gives them)")
    if k is not None and k > num_blocks:
        raise ValueError(f"k={k} but {base.get('model')!r} has {num_blocks} blocks; choose k in 1..{num_blocks}")
    load_task(base.get("task", "default"))
    load_tokenizer(base.get("model", "default"), **loader_options(base))


def join_ray_cluster(address: str) -> None:
    """``ray.init(address=...)``, failing at once with a ConnectionError that names the address and the fix
    when no cluster answers there."""
    import ray

    check_ray_address(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise ConnectionError(f"cannot join the Ray cluster at --address {address}: {str(exc).strip().splitlines()[0]}"
                              "; start it with `ray start --head`, or leave --address out to run on this machine"
                              ) from None


def check_local_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Raise ValueError when a trial asks this machine's running Ray for more CPUs or GPUs than it has: Tune
    would wait for them forever."""
    import ray

    available = ray.cluster_resources()
    for key, need, option in (("CPU", cpus_per_trial, "--cpus-per-trial"), ("GPU", gpus_per_trial, "--gpus-per-trial")):
        have = available.get(key, 0)
        if need > have:
            raise ValueError(f"{option} {need:g} but Ray on this machine has {have:g} {key}(s), so no trial could "
                             f"start; lower {option}" + (" (0 trains on the CPU)" if key == "GPU" else "")
                             + ", or join a cluster that has them with --address")


def storage_location(out: Path, storage_path: str | None) -> str:
    """Where a comparison's Tune experiments live: `storage_path` (a URI such as s3://... as given, a local
    path made absolute), else ``<out>/ray``."""
    if storage_path and "://" in storage_path:  # s3://, gs://, ...: shared by every node of a cluster
        return storage_path.rstrip("/")
    return str(Path(storage_path).expanduser().absolute() if storage_path else Path(out) / "ray")


def check_succeeded(rows: Iterable[Mapping[str, Any]], metric: str, trials_file: Path) -> None:
    """Raise `NoSuccessfulTrialError` (after the results are written) when no fine-tune trial of `rows` ended
    with a finite `metric`, naming the first trial's error: a comparison in which every trial failed is not
    a success."""
    from .report import NoSuccessfulTrialError

    rows = list(rows)
    if any(r["stage"] == "finetune" and r["status"] != "ERROR" and isinstance(r.get(metric), int | float)
           and math.isfinite(r[metric]) for r in rows):
        return
    failed = [r for r in rows if r.get("error")]
    first = f"; the first error: {failed[0]['error']}" if failed else ""
    raise NoSuccessfulTrialError(f"no fine-tune trial succeeded ({len(failed)} of {len(rows)} trials failed){first}. "
                                 f"Every trial is listed in {trials_file}")
