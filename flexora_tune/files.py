"""Files the commands read and write: output paths checked before any work is spent (a folder where a file is
needed, a file where a folder is, a device such as /dev/full, no permission), results written whole or rescued
to a temporary file when writing fails, and selection files read with their name in every error."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .blocks import BlockSelection


class OutputPathError(ValueError):
    """An output path that cannot be written (a file where a folder is needed, a device, no permission)."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_folder(folder: Path, option: str, shown: str) -> None:
    """Create and delete a temporary file in the existing `folder`; raise naming `option` when that fails."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write {option} {shown}: {folder} is not writable ({exc.strerror or exc}); "
                              "choose a writable location") from None


def _check_parents(folder: Path, option: str, shown: str) -> None:
    """Every existing part of `folder` is a folder and the deepest existing one is writable."""
    existing = _nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise OutputPathError(f"cannot write {option} {shown}: {existing} is a file, not a folder; choose a path "
                              "inside a folder")
    _probe_folder(existing, option, shown)


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """Check, before any work, that the file `path` can be written: not a folder, not a device or pipe (e.g.
    /dev/full), inside folders that exist or can be created, writable. Creates nothing; returns the path."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputPathError(f"cannot write {option} {path}: it is a folder; give a file name, e.g. "
                              f"{target / 'result.json'}")
    if target.exists() and not target.is_file():
        raise OutputPathError(f"cannot write {option} {path}: it is not a regular file (a device, pipe or socket); "
                              "give the path of a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"cannot write {option} {path}: the file is read-only; choose another path")
    _check_parents(target.parent, option, str(path))
    return target


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Check, before any work, that the folder `path` can hold results: not a file, creatable, writable.
    Creates nothing; returns the absolute path."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"cannot write {option} {path}: it is a file, not a folder; give a folder path")
    _check_parents(target, option, str(path))
    return target


def _file_mode(target: Path) -> int:
    """The permissions `target` has, or those a new file gets under the process's umask."""
    if target.is_file():
        return target.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_output(path: str | Path, text: str, what: str) -> Path:
    """Write `text` to `path` whole (a temporary file renamed into place). When that fails (disk full, a path
    that changed since `check_output_file`), save it to a temporary file instead and raise `OutputPathError`
    naming both paths, so a finished result is never lost."""
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as fh:
                fh.write(text)
            os.chmod(staging, _file_mode(target))  # mkstemp's 0600, else: what a plain write would give
            os.replace(staging, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staging)
        return target
    except OSError as exc:
        handle, rescue = tempfile.mkstemp(prefix="flexora-tune-", suffix=target.suffix or ".json")
        with os.fdopen(handle, "w") as fh:
            fh.write(text)
        raise OutputPathError(f"could not write the {what} to {path} ({exc.strerror or exc}); it was saved to "
                              f"{rescue} instead") from None


def read_selection_file(path: str | Path) -> BlockSelection:
    """The `BlockSelection` in the JSON file `path` (from `search` or `compare`); every error names the file."""
    from .blocks import BlockSelection

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read selection file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"selection file {path} is not a JSON text file (byte {exc.start} is not UTF-8); give the "
                         "selection JSON that `flexora-tune search` or `compare` wrote") from None
    try:
        return BlockSelection.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"selection file {path}: {exc}") from None
