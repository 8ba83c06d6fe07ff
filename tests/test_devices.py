"""The trial device check (flexora_tune.devices): a trial that Ray gave a GPU and that cannot use CUDA fails at
once and says why, instead of training on the CPU. CUDA's failures are faked on this CPU-only machine by
patching torch; the Ray GPU assignment is faked with the logical GPU of the shared test session."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from flexora_tune.devices import TrialDeviceError, trial_device

DRIVER_TOO_OLD = ("The NVIDIA driver on your system is too old (found version 11040). Please update your GPU "
                  "driver by downloading and installing a new version from the URL: http://www.nvidia.com/Download/"
                  "index.aspx Alternatively, go to: https://pytorch.org to install a PyTorch version that has been "
                  "compiled with your version of the CUDA driver.")
NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
             "driver from http://www.nvidia.com/Download/index.aspx")


@pytest.fixture
def cuda_build(monkeypatch):
    """Pretend torch is a CUDA build whose `torch.cuda.init` succeeds and sees `state["count"]` devices, or
    raises `state["error"]`."""
    state = {"count": 1, "error": None}

    def init():
        if state["error"] is not None:
            raise state["error"]

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    return state


def test_no_gpu_assigned_trains_on_the_cpu():
    assert trial_device([]) == "cpu"
    assert trial_device(None) == "cpu"


def test_working_cuda_with_an_assigned_gpu(cuda_build):
    assert trial_device(["0"]) == "cuda"
    assert trial_device([1], requested="cuda:0") == "cuda:0"


def test_cpu_build_of_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(TrialDeviceError, match="CPU-only build") as info:
        trial_device(["0"])
    assert info.value.problem == "no_cuda_build"
    assert "GPU(s) [0]" in str(info.value) and "download.pytorch.org/whl/cu" in str(info.value)


@pytest.mark.parametrize("message", [DRIVER_TOO_OLD, NO_DRIVER,
                                     "CUDA driver version is insufficient for CUDA runtime version"])
def test_driver_missing_or_too_old(cuda_build, message):
    cuda_build["error"] = RuntimeError(message)
    with pytest.raises(TrialDeviceError, match="CUDA failed to initialise") as info:
        trial_device(["0"])
    assert info.value.problem == "driver"
    assert message.splitlines()[0] in str(info.value) and "update the NVIDIA driver" in str(info.value)


@pytest.mark.parametrize("message", ["No CUDA GPUs are available", "no CUDA-capable device is detected"])
def test_no_visible_device_at_init(cuda_build, message):
    cuda_build["error"] = RuntimeError(message)
    with pytest.raises(TrialDeviceError) as info:
        trial_device(["0"])
    assert info.value.problem == "no_visible_device" and "--gres" in str(info.value)


def test_no_visible_device_after_init(cuda_build):
    cuda_build["count"] = 0
    with pytest.raises(TrialDeviceError, match="torch sees no CUDA device") as info:
        trial_device(["0"])
    assert info.value.problem == "no_visible_device"


def test_cuda_visible_devices_hides_every_device(cuda_build, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(TrialDeviceError, match="hides every device") as info:
        trial_device(["0"])
    assert info.value.problem == "no_visible_device"


def test_other_cuda_failure(cuda_build):
    cuda_build["error"] = RuntimeError("CUDA unknown error - this may be due to an incorrectly set up environment")
    with pytest.raises(TrialDeviceError, match="CUDA unknown error") as info:
        trial_device(["0"])
    assert info.value.problem == "cuda_init"


def test_an_explicit_device_setting(cuda_build):
    assert trial_device(["0"], requested="cpu") == "cpu"  # an explicit choice, e.g. a logical GPU in tests
    with pytest.raises(TrialDeviceError, match="assigned this trial no GPU") as info:
        trial_device([], requested="cuda")
    assert info.value.problem == "not_assigned"


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_task_given_a_logical_gpu_fails_at_once(ray_session):
    """The real Ray assignment: the shared session declares one logical GPU, so a task asking for it gets
    `ray.get_gpu_ids() == [0]`; with the CPU build of torch here the check names that case."""
    if torch.version.cuda is not None:
        pytest.skip("torch here is a CUDA build; this checks the CPU-build case")

    @ray_session.remote(num_gpus=0.5, num_cpus=0)
    def device_of_a_gpu_task() -> tuple[list, str, str]:
        import ray

        from flexora_tune.devices import TrialDeviceError, trial_device

        try:
            return ray.get_gpu_ids(), trial_device(ray.get_gpu_ids()), ""
        except TrialDeviceError as exc:
            return ray.get_gpu_ids(), exc.problem, str(exc)

    @ray_session.remote(num_gpus=0, num_cpus=0)
    def device_of_a_cpu_task() -> str:
        import ray

        from flexora_tune.devices import trial_device

        return trial_device(ray.get_gpu_ids())

    started = time.time()
    ids, problem, message = ray_session.get(device_of_a_gpu_task.remote(), timeout=60)
    assert ids and problem == "no_cuda_build" and "CPU-only build" in message, (ids, problem, message)
    assert ray_session.get(device_of_a_cpu_task.remote(), timeout=60) == "cpu"
    assert time.time() - started < 60


@pytest.mark.ray
@pytest.mark.slow
def test_a_tune_trial_given_a_gpu_that_cannot_use_cuda_fails_at_once(ray_session, tiny_llama_dir, tiny_csv,
                                                                      tmp_path):
    """The trainable itself: a trial that Ray gave (a share of) the session's logical GPU errors before it loads
    the model, with the reason, instead of training on the CPU; with ``device: cpu`` it trains on the CPU."""
    if torch.version.cuda is not None:
        pytest.skip("torch here is a CUDA build; this checks the CPU-build case")
    from ray import tune

    from flexora_tune.tune_trainable import trainable_with_resources

    base = {"model": str(tiny_llama_dir), "task": {"source": str(tiny_csv), "max_length": 32}, "max_steps": 2,
            "eval_every": 2, "batch_size": 8}
    started = time.time()
    analysis = tune.run(trainable_with_resources({"cpu": 1, "gpu": 0.5}), config=base, num_samples=1,
                        storage_path=str(tmp_path / "gpu"), verbose=0, raise_on_failed_trial=False, max_failures=0)
    (trial,) = analysis.trials
    assert trial.status == "ERROR" and time.time() - started < 60
    error = (Path(trial.local_path) / "error.txt").read_text()
    assert "TrialDeviceError" in error and "CPU-only build" in error and "--gpus-per-trial 0" in error, error[-2000:]
    assert not trial.last_result.get("step"), "the trial must fail before it trains"

    analysis = tune.run(trainable_with_resources({"cpu": 1, "gpu": 0.5}), config={**base, "device": "cpu"},
                        num_samples=1, storage_path=str(tmp_path / "cpu"), verbose=0)
    assert set(analysis.dataframe()["device"]) == {"cpu"}


def test_the_error_survives_pickling():
    """Ray pickles a failed trial's exception to send it to the driver."""
    import copy
    import pickle

    error = TrialDeviceError("driver", "Ray assigned this trial GPU(s) [0], but CUDA failed to initialise: old")
    for clone in (pickle.loads(pickle.dumps(error)), copy.deepcopy(error)):
        assert type(clone) is TrialDeviceError and clone.problem == "driver" and str(clone) == str(error)
