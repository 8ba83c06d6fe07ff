"""The device a Ray trial trains on, checked once at the start of the trial.

A trial that Ray gave a GPU (whole or fractional) must train on that GPU. Falling back to the CPU when CUDA
does not work there (a CPU wheel of torch, a driver too old for torch's CUDA, a SLURM step started without
its GPUs) lets a sweep "succeed" many times slower while the GPU it reserved sits idle, so `trial_device`
fails the trial at once instead, with an error that says which of these it is and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

Problem = Literal["no_cuda_build", "no_visible_device", "driver", "cuda_init", "not_assigned"]

_FIXES: dict[str, str] = {
    "no_cuda_build": "install the CUDA build of torch on every GPU node before the package, e.g. `pip install "
                     "torch --index-url https://download.pytorch.org/whl/cu128` (scripts/setup.sh keeps an "
                     "installed torch), or run the sweep with --gpus-per-trial 0",
    "no_visible_device": "check that the node's Ray was started with the GPUs it declares (`nvidia-smi` on the "
                         "node; in SLURM, give the `srun` step that runs `ray start` its GPUs with --gpus-per-node "
                         "or --gres) and that nothing clears CUDA_VISIBLE_DEVICES",
    "driver": "update the NVIDIA driver on the node, or install a torch build for an older CUDA that the driver "
              "supports (`nvidia-smi` shows the driver's CUDA version)",
    "cuda_init": "run `python -c \"import torch; torch.cuda.init()\"` on the node to see the failure, fix the "
                 "driver or device, or run the sweep with --gpus-per-trial 0",
    "not_assigned": "give the trial a GPU (--gpus-per-trial, or tune.with_resources(..., {'gpu': ...})) so Ray "
                    "does not place other work on it, or drop the `device` setting",
}


class TrialDeviceError(RuntimeError):
    """A trial cannot use the device Ray gave it. `problem` names the case: ``no_cuda_build`` (torch is a
    CPU build), ``no_visible_device`` (CUDA works but shows no device), ``driver`` (no NVIDIA driver, or one
    too old for torch's CUDA), ``cuda_init`` (CUDA failed to initialise for another reason) or
    ``not_assigned`` (a CUDA device was requested for a trial that Ray gave no GPU)."""

    def __init__(self, problem: Problem, detail: str) -> None:
        self.problem = problem
        self.detail = detail
        super().__init__(f"{detail}; fix: {_FIXES[problem]}")

    def __reduce__(self) -> tuple[type[TrialDeviceError], tuple[str, str]]:
        # Ray pickles a trial's exception to hand it to the driver; the default would call cls(message).
        return type(self), (self.problem, self.detail)


def trial_device(assigned_gpu_ids: Sequence[object] | None, requested: str | None = None) -> str:
    """The torch device a Ray trial trains on: ``"cuda"`` when Ray assigned it GPUs (`assigned_gpu_ids`,
    i.e. ``ray.get_gpu_ids()``) and CUDA works in this process, ``"cpu"`` when it was assigned none.

    `requested` is the trial's own ``device`` setting, if any: ``"cpu"`` keeps the trial on the CPU even with
    a GPU assigned (an explicit choice, e.g. a logical GPU on a CPU-only test machine); ``"cuda"``/``"cuda:N"``
    is checked like an assigned GPU and must come with one; any other device is returned unchanged.

    Raises `TrialDeviceError` at once, naming the case and its fix, when a GPU was assigned (or CUDA
    requested) and torch cannot use it: never a silent fallback to the CPU.
    """
    assigned = [g for g in (assigned_gpu_ids or ()) if str(g).strip() != ""]
    if requested:
        if requested == "cpu" or not requested.startswith("cuda"):
            return requested
        if not assigned:
            raise TrialDeviceError("not_assigned", f"device {requested!r} was requested but Ray assigned this "
                                                   "trial no GPU, so other trials may be placed on the same one")
    elif not assigned:
        return "cpu"
    _check_cuda(assigned)
    return requested or "cuda"


def _check_cuda(assigned: Sequence[object]) -> None:
    """Raise `TrialDeviceError` unless torch can use at least one CUDA device in this process."""
    import torch

    ids = ",".join(str(g) for g in assigned)
    where = f"Ray assigned this trial GPU(s) [{ids}]"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise TrialDeviceError("no_cuda_build", f"{where}, but torch {torch.__version__} is a CPU-only build "
                                                "(torch.version.cuda is None)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        raise TrialDeviceError("no_visible_device", f"{where}, but CUDA_VISIBLE_DEVICES={visible!r} hides "
                                                    "every device from this process")
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError (or AssertionError) with the driver's reason
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrialDeviceError(_classify(message), f"{where}, but CUDA failed to initialise: {message}") from exc
    count = torch.cuda.device_count()
    if count < 1:
        raise TrialDeviceError("no_visible_device", f"{where}, but torch sees no CUDA device "
                                                    f"(CUDA_VISIBLE_DEVICES={visible!r})")


def _classify(message: str) -> Problem:
    """Which case a CUDA initialisation error is, from torch's message."""
    text = message.lower()
    if "not compiled with cuda" in text:
        return "no_cuda_build"
    if "driver" in text and any(w in text for w in ("too old", "insufficient", "no nvidia driver",
                                                    "found no", "version")):
        return "driver"
    if any(w in text for w in ("no cuda gpus are available", "no cuda-capable device", "invalid device ordinal",
                               "no device")):
        return "no_visible_device"
    return "cuda_init"
