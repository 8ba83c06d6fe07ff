"""Helpers shared by the benchmark scripts: the machine and load they ran on, the command that produced a
result, peak-memory probes for CPU processes, and writing results as JSON, CSV and Markdown.

Nothing here imports Ray, so `gpu.py` can use it on a node without Ray.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def command_line() -> str:
    """The command that is running, as one could paste it into a shell from the repository root."""
    python = sys.executable
    try:
        python = os.path.relpath(python, REPO) if Path(python).is_relative_to(REPO) else python
    except ValueError:
        pass
    script = sys.argv[0]
    try:
        script = os.path.relpath(Path(script).resolve(), REPO)
    except ValueError:
        pass
    return " ".join(shlex.quote(part) for part in [python, script, *sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name as `lscpu` prints it (falls back to /proc/cpuinfo, then `platform`)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    """The checked-out commit (with ``+dirty`` when the work tree has changes), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}+dirty" if rev and dirty else (rev or "unknown")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """Date, host CPU, core count, memory, load average and library versions, for a result's header."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_revision(),
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    for name in ("transformers", "peft", "ray", "optuna"):
        try:
            module = __import__(name) if name != "ray" or "ray" in sys.modules else None
            if module is not None:
                info[name] = module.__version__
        except ImportError:
            pass
    return info


class LoadSampler:
    """Collects the 1-minute load average at the moments `sample` is called, to report the load during a
    run (the machine is shared, so figures must be read against it)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._stop: threading.Event | None = None

    def sample(self) -> float:
        value = os.getloadavg()[0]
        self.samples.append(value)
        return value

    def start(self, every_s: float = 30.0) -> None:
        """Also sample every `every_s` seconds in a background thread until `stop` (for long runs)."""
        self._stop = stop = threading.Event()
        self.sample()

        def loop() -> None:
            while not stop.wait(every_s):
                self.sample()

        threading.Thread(target=loop, name="load-sampler", daemon=True).start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        self.sample()

    def summary(self) -> dict[str, float]:
        if not self.samples:
            self.sample()
        return {"min": round(min(self.samples), 2), "mean": round(sum(self.samples) / len(self.samples), 2),
                "max": round(max(self.samples), 2), "n": len(self.samples)}


# --- peak memory of this process on Linux -----------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM) to the current RSS.

    Linux >= 4.0 resets it when "5" is written to /proc/self/clear_refs; returns False where that is not
    possible, in which case `peak_rss_bytes` is the peak since the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since the last `reset_peak_rss` (VmHWM), else since the process started (ru_maxrss)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- statistics and output ----------------------------------------------------------------------------------

def median(values: Iterable[float]) -> float:
    """The median of the finite values (NaN when there are none)."""
    data = sorted(v for v in values if v == v)
    if not data:
        return float("nan")
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def spread(values: Iterable[float]) -> tuple[float, float]:
    """(min, max) of the finite values."""
    data = [v for v in values if v == v]
    return (min(data), max(data)) if data else (float("nan"), float("nan"))


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows (dicts) as CSV; the header is the union of keys in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header: list[str] = []
    for row in rows:
        header.extend(k for k in row if k not in header)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in row.items()})
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header_markdown(title: str, info: Mapping[str, Any], command: str, load: Mapping[str, float] | None) -> str:
    """The common head of a result file: title, command, date, machine and load."""
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "peft", "ray", "optuna") if k in info)
    lines = [
        f"# {title}", "",
        f"- Command: `{command}`",
        f"- Date: {info.get('date')}; commit {info.get('git')}",
        f"- Machine: {info.get('cpus')} CPUs ({info.get('cpu_model')}), {info.get('memory_gib', '?')} GiB RAM; "
        f"{versions}",
    ]
    if load:
        lines.append(f"- Load average (1 min) during the run: min {load['min']}, mean {load['mean']}, "
                     f"max {load['max']} ({load['n']} samples); at the start {info.get('load_avg_1_5_15')}")
    return "\n".join(lines) + "\n"


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table, or ``-`` for NaN/None."""
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}"
