"""Bad input, as a new user would type it (issue 15): every case ends with a clear message that names the problem
and the fix, before any compute where the input allows it, and no earlier result file changes.

CLI cases run the real command (in-process `cli.main`, or the installed `flexora-tune` in a subprocess where a
second process, stdin or a signal matters); compare cases that need a trial run through the shared local Ray
session on the tiny model. Cases numbered as in the issue.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny

from flexora_tune.cli import main

FT = str(Path(sys.executable).parent / "flexora-tune")
TINY = ["--max-length", "32"]
COMPARE = ["--strategies", "all", "--trials", "1", "--max-steps", "2", *TINY]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def run_cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """The installed command in its own process."""
    return subprocess.run([FT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env(),
                          **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (Tune's state included) and its bytes; the lock file is not a result."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".compare.lock"}


def fails(argv: list[str], capsys, *fragments: str) -> str:
    """Run `flexora-tune argv` in-process; assert exit code 2 and a one-line message holding every fragment."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to open a model for training fails the test."""
    def trained(*args, **kwargs):
        raise AssertionError("a model was opened for training")

    for module in ("flexora_tune.finetune", "flexora_tune.flexora.api"):
        monkeypatch.setattr(importlib.import_module(module), "open_lora_session", trained)


@pytest.fixture(scope="module")
def earlier(ray_session, tiny_llama_dir, tiny_csv, tmp_path_factory) -> Path:
    """A finished comparison's results folder (one tiny fine-tune), as a later run finds it."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    assert main(["compare", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *COMPARE, "--out", str(out)]) == 0
    return out


# 1. A second compare on the same --out while one runs is refused.
@pytest.mark.ray
def test_a_second_compare_on_a_busy_results_folder_is_refused(earlier, tiny_llama_dir, tiny_csv):
    from flexora_tune.guards import results_lock

    before = snapshot(earlier)
    with results_lock(earlier):  # what a running compare holds
        done = run_cli("compare", "--model", tiny_llama_dir, "--task", tiny_csv, *COMPARE, "--out", earlier)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another `flexora-tune compare` is writing to" in done.stderr and "another --out" in done.stderr
    assert "Traceback" not in done.stderr and snapshot(earlier) == before


# 2. --resume with another model or other settings is refused, naming the keys; the same settings resume.
@pytest.mark.ray
def test_resume_refuses_another_configuration_naming_the_differing_keys(earlier, tiny_llama_dir, tiny_csv,
                                                                          tmp_path, capsys):
    before = snapshot(earlier)
    common = ["compare", "--task", str(tiny_csv), "--strategies", "all", "--trials", "1", *TINY,
              "--out", str(earlier), "--resume"]
    fails([*common, "--model", str(tiny_llama_dir), "--max-steps", "3"], capsys,
          "cannot resume", "settings.max_steps: 2 there, 3 now", "another --out")
    other = tiny.save_model_dir(tmp_path / "mistral", "mistral")
    err = fails([*common, "--model", str(other), "--max-steps", "2"], capsys, "num_blocks_total: 4 there, 3 now")
    assert f'model: "{tiny_llama_dir}" there, "{other}" now' in err
    assert snapshot(earlier) == before
    assert main([*common, "--model", str(tiny_llama_dir), "--max-steps", "2"]) == 0
    assert "comparison: already finished" in capsys.readouterr().out


# 3. --resume on a folder without an earlier comparison is refused; nothing there changes.
def test_resume_refuses_a_folder_without_an_earlier_comparison(tiny_llama_dir, tiny_csv, tmp_path, capsys):
    own = tmp_path / "own"
    own.mkdir()
    (own / "trials.csv").write_text("my,own\n1,2\n")
    (own / "meta.json").write_text('{"author": "me"}')
    argv = ["compare", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *COMPARE, "--out", str(own),
            "--resume"]
    fails(argv, capsys, f"{own} holds no earlier comparison (no meta.json written by `flexora-tune compare`) but "
          "other files (meta.json, trials.csv); give this run another --out")
    assert sorted(p.name for p in own.iterdir()) == ["meta.json", "trials.csv"]
    assert (own / "trials.csv").read_text() == "my,own\n1,2\n" and (own / "meta.json").read_text() == '{"author": "me"}'


def test_resume_starts_a_comparison_where_there_is_nothing_to_lose(tmp_path):
    """A job that always passes --resume (the cluster entrypoints) works on its first run, and after a crash
    before any experiment saved its state."""
    from flexora_tune.guards import check_resume

    meta = {"model": "m", "task": "t", "metric": "val_accuracy", "strategies": ["all"], "seeds": 1, "trials": 1,
            "settings": {}, "num_blocks_total": 4, "command": "flexora-tune compare --resume"}
    args = (tmp_path / "ray", ["comparison"], meta, "meta.json", "finished_experiments.json")
    (tmp_path / "new").mkdir()
    assert "nothing to resume" in check_resume(tmp_path / "new", *args)
    (tmp_path / "new" / "meta.json").write_text(json.dumps({**meta, "command": "flexora-tune compare"}))
    assert "no finished experiment or Tune state yet; starting it" in check_resume(tmp_path / "new", *args)


# 4. Output paths are checked before any training.
@pytest.mark.parametrize("command", ["search", "finetune"])
def test_output_files_are_checked_before_training(command, tiny_llama_dir, tiny_csv, tmp_path, capsys, no_training):
    (tmp_path / "afile").write_text("not a folder")
    base = [command, "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *TINY]
    fails([*base, "--out", str(tmp_path / "afile" / "sel.json")], capsys,
          f"{tmp_path / 'afile'} is a file, not a folder")
    fails([*base, "--out", "/dev/full"], capsys, "--out /dev/full", "not a regular file")
    fails([*base, "--out", str(tmp_path)], capsys, f"--out {tmp_path}: it is a folder; give a file name")
    read_only = _read_only_folder(tmp_path)
    fails([*base, "--out", str(read_only / "sel.json")], capsys, f"{read_only} is not writable")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_output_folders_are_checked_before_any_work(tiny_llama_dir, tiny_csv, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"blocks": [1], "num_blocks_total": 4}))
    for argv in (["compare", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *COMPARE],
                 ["export", str(selection), "--model", str(tiny_llama_dir)]):
        fails([*argv, "--out", str(tmp_path / "afile")], capsys,
              f"--out {tmp_path / 'afile'}: it is a file, not a folder")
        fails([*argv, "--out", str(tmp_path / "afile" / "sub")], capsys, "is a file, not a folder")
    fails(["compare", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *COMPARE, "--out",
           str(tmp_path / "out"), "--storage-path", str(tmp_path / "afile")], capsys, "--storage-path")
    assert not (tmp_path / "out").exists() and (tmp_path / "afile").read_text() == "not a folder"


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: a chmod 555 one, or /sys when running as root."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
        return folder
    if not os.access("/sys", os.W_OK) or _unwritable(Path("/sys")):
        return Path("/sys")
    pytest.skip("no read-only folder available to this user")


def _unwritable(folder: Path) -> bool:
    try:
        (folder / f"flexora_probe_{os.getpid()}").touch()
    except OSError:
        return True
    return False


def test_a_result_that_cannot_be_written_is_saved_elsewhere(tmp_path):
    from flexora_tune.files import OutputPathError, write_output

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match=r"could not write the selection to .*; it was saved to \S+ instead") as e:
        write_output(tmp_path / "afile" / "sel.json", '{"blocks": [1]}', "selection")
    rescued = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
    assert rescued.read_text() == '{"blocks": [1]}'
    rescued.unlink()


# 5. finetune --selection for a model with another block count is refused before training.
def test_finetune_refuses_a_selection_made_for_another_model(tiny_llama_dir, tiny_csv, tmp_path, capsys,
                                                             no_training):
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"blocks": [0, 1, 2], "num_blocks_total": 30}))
    out = tmp_path / "ft.json"
    fails(["finetune", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), "--selection", str(selection),
           "--out", str(out)], capsys, f"selection {selection} is for a model with 30 blocks", "has 4",
          "use a selection made for this model")
    assert not out.exists()


# 6. Rows with a missing label are counted in a warning; all labels missing says so (tasks.py).
def test_missing_labels_are_counted_and_all_missing_is_named(tmp_path):
    from flexora_tune import TaskError, load_task

    rows = tiny.classification_rows(60)
    for row in rows[:10]:
        row["label"] = ""
    with pytest.warns(UserWarning, match="dropped 10 of 60 rows"):
        load_task({"source": str(tiny.write_csv(tmp_path / "some.csv", rows)), "max_length": 32})
    for row in rows:
        row["label"] = ""
    with pytest.raises(TaskError, match="every row's 'label' is missing; fill the column"):
        load_task({"source": str(tiny.write_csv(tmp_path / "none.csv", rows)), "max_length": 32})


# 7. report ranks only by a validation metric (and headers name it).
@pytest.mark.ray
def test_report_refuses_a_training_metric(earlier, capsys):
    before = snapshot(earlier)
    fails(["report", str(earlier), "--metric", "train_loss"], capsys, "train_loss", "val_")
    assert snapshot(earlier) == before


# 8. A diverged run stops naming the step and the fix; --top-k 0 and --budget-s nan are errors.
@pytest.mark.parametrize("command", ["finetune", "search"])
def test_a_diverging_run_stops_with_the_step_and_the_fix(command, tiny_llama_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out.json"
    extra = ["--max-steps", "4"] if command == "finetune" else ["--steps", "4", "--stop-when-stable", "0"]
    fails([command, "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *TINY, "--lr", "1e6", *extra,
           "--out", str(out)], capsys, "diverged to", "step ", "lower the")
    assert not out.exists()


def test_top_k_zero_and_a_nan_budget_are_errors(tiny_llama_dir, tiny_csv, tmp_path, capsys, no_training):
    fails(["search", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), "--top-k", "0"], capsys,
          "argument --top-k: must be an integer >= 1, got 0")
    fails(["compare", "--budget-s", "nan", "--out", str(tmp_path / "c")], capsys, "argument --budget-s", "nan")
    from flexora_tune.compare import compare

    with pytest.raises(ValueError, match="budget_s must be a positive number of seconds, got nan"):
        compare(out=tmp_path / "c", budget_s=math.nan)
    assert not (tmp_path / "c").exists()


# 9. compare checks every setting before Ray starts; a trial's error is one readable line.
@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-steps", "0", "must be an integer >= 1, got 0"), ("--batch-size", "0", "must be an integer >= 1"),
    ("--epochs", "-1", "must be an integer >= 1, got -1"), ("--val-size", "0", "must be a finite number > 0"),
    ("--device", "tpu", "'tpu' is not a device this package trains on; use cpu, cuda"),
    ("--max-length", "4", "must be an integer >= 8, got 4"), ("--lr", "nan", "must be a finite number > 0"),
    ("--gpus-per-trial", "-1", "must be a finite number >= 0"), ("--max-concurrent", "0", ">= 1"),
])
def test_compare_options_are_checked_before_ray(option, value, message, tmp_path, capsys):
    fails(["compare", option, value, "--out", str(tmp_path / "c")], capsys, f"argument {option}", message)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"settings": {"max_steps": 0}}, "bad finetune setting: max_steps must be >= 1"),
    ({"settings": {"batch_size": 0}}, "batch_size must be a positive number, got 0"),
    ({"settings": {"search": {"steps": 0}}}, "bad search setting: steps must be a positive number"),
    ({"settings": {"device": "tpu"}}, "device 'tpu' is not a device this package trains on"),
    ({"settings": {"device": "cuda"}}, "needs gpus_per_trial > 0 (--gpus-per-trial)"),
    ({"task_overrides": {"max_length": 4}}, "max_length must be at least 8 tokens, got 4"),
    ({"task_overrides": {"val_size": 0}}, "val_size must be a positive fraction or count"),
    ({"task_overrides": {"val_size": 10_000}}, "too few for search_val/val/test sizes"),
    ({"k": 9}, "k=9 but"), ({"max_concurrent": 0}, "max_concurrent must be a positive int"),
])
def test_compare_settings_are_checked_before_ray(options, message, tiny_llama_dir, tiny_csv, tmp_path):
    from flexora_tune.compare import compare

    options = dict(options)
    task = {"source": str(tiny_csv), "max_length": 32, **options.pop("task_overrides", {})}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare(out=tmp_path / "c", model=str(tiny_llama_dir), task=task, strategies=("flexora", "all"), **options)
    assert not (tmp_path / "c").exists()


@pytest.mark.ray
def test_a_diverging_compare_exits_non_zero_with_a_readable_trial_error(ray_session, tiny_llama_dir, tiny_csv,
                                                                        tmp_path, capsys):
    out = tmp_path / "c"
    fails(["compare", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *COMPARE, "--max-steps", "3",
           "--lr", "1e30", "--max-failures", "0", "--out", str(out)], capsys,
          "no fine-tune trial succeeded (1 of 1 trials failed); the first error: FloatingPointError: the training "
          "loss", "lower the learning rate")
    import pandas as pd

    error = pd.read_csv(out / "trials.csv")["error"].iloc[0]
    assert error.startswith("FloatingPointError: the training loss") and "step" in error
    assert "\x1b" not in error and "ray::" not in error and "pid=" not in error and "\n" not in error


def test_trial_errors_are_one_readable_line():
    from flexora_tune.guards import error_line

    raw = ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=16833, ip=10.0.0.2, actor_id=d0d4, repr=trainable)\n"
           '  File "training.py", line 176, in check_loss\n    raise FloatingPointError(message)\n'
           "FloatingPointError: the training loss became nan at step 3: lower the learning rate")
    assert error_line(raw) == "FloatingPointError: the training loss became nan at step 3: lower the learning rate"
    assert error_line(ValueError("bad\nsecond line")) == "ValueError: bad" and error_line(None) == ""


# 10. OS errors and an unreachable --address are one-line messages with exit code 2.
@pytest.mark.parametrize("error", [NotADirectoryError(20, "Not a directory", "a/b"),
                                   IsADirectoryError(21, "Is a directory", "d"),
                                   FileExistsError(17, "File exists", "f"),
                                   PermissionError(13, "Permission denied", "/p"),
                                   ConnectionError("Could not find any running Ray instance.\nmore")])
def test_os_errors_become_one_line_messages(error, tmp_path, monkeypatch, capsys):
    def handler(args):
        raise error

    monkeypatch.setattr("flexora_tune.cli._cmd_report", handler)  # build_parser binds the patched handler
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flexora-tune report: error: ") and "Traceback" not in err


def test_a_directory_given_as_the_task_file_is_a_message(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "data.csv").mkdir()
    fails(["finetune", "--model", str(tiny_llama_dir), "--task", str(tmp_path / "data.csv")], capsys,
          str(tmp_path / "data.csv"))


def test_an_unreachable_ray_address_fails_at_once(tiny_llama_dir, tiny_csv, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    started = time.time()
    done = run_cli("compare", "--model", tiny_llama_dir, "--task", tiny_csv, *COMPARE, "--out", tmp_path / "c",
                   "--address", f"127.0.0.1:{port}")
    assert done.returncode == 2 and time.time() - started < 60
    assert f"cannot reach the Ray cluster at --address 127.0.0.1:{port}" in done.stderr
    assert "ray start --head" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "c" / "meta.json").exists()


# 11. Ctrl-C says what was kept.
def _take_ctrl_c() -> None:
    """In the child: Ctrl-C's default action, even when the suite itself runs where SIGINT is ignored (a shell's
    background job without job control), so that the CLI's own handling is what the test sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_search_says_nothing_was_written(tiny_llama_dir, tiny_csv, tmp_path):
    out = tmp_path / "sel.json"
    proc = subprocess.Popen([FT, "search", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *TINY,
                             "--steps", "100000", "--stop-when-stable", "0", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_take_ctrl_c)
    try:
        line = ""
        deadline = time.time() + 90
        while "[flexora] step" not in line and time.time() < deadline:
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; nothing was written" in err and "finished results are kept" not in err
    assert not out.exists()


def test_ctrl_c_before_a_comparison_saved_anything_says_there_is_nothing_to_resume(tiny_llama_dir, tiny_csv,
                                                                                   tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("flexora_tune.compare._init_ray", interrupted)
    argv = ["compare", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), *COMPARE, "--out", str(tmp_path / "c")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "finished results are kept" not in err


# 12. Unreadable inputs name the file (the selection, a JSONL line, a model without tokenizer).
def test_a_binary_selection_file_is_named(tiny_llama_dir, tiny_csv, tmp_path, capsys, no_training):
    binary = tmp_path / "sel.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    fails(["finetune", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), "--selection", str(binary)], capsys,
          f"selection file {binary} is not a JSON text file")
    fails(["export", str(binary), "--model", str(tiny_llama_dir), "--out", str(tmp_path / "cfg")], capsys,
          f"selection file {binary}")
    (tmp_path / "bad.json").write_text("{not json")
    fails(["export", str(tmp_path / "bad.json"), "--model", str(tiny_llama_dir), "--out", str(tmp_path / "cfg")],
          capsys, f"selection file {tmp_path / 'bad.json'}: not a block selection JSON")
    fails(["finetune", "--blocks", "3-1"], capsys, "'3-1' is a reversed range; write 1-3")
    assert not (tmp_path / "cfg").exists()


def test_a_bad_jsonl_line_is_numbered(tmp_path):
    from flexora_tune import TaskError, load_task

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", label: z}\n')
    with pytest.raises(TaskError, match=f"{path}: line 3"):
        load_task(str(path))


def test_a_model_folder_without_tokenizer_files_says_so(tiny_llama_dir, tmp_path):
    from flexora_tune import ModelNotFoundError
    from flexora_tune.models import load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    with pytest.raises(ModelNotFoundError, match=f"no tokenizer files in {bare}"):
        load_tokenizer(str(bare))


# 13. SelectionResult.from_analysis refuses an unknown mode or metric.
def test_from_analysis_refuses_an_unknown_mode_or_metric():
    from flexora_tune.results import best_search_selection

    outcomes = [({"stage": "finetune", "val_accuracy": 0.5, "blocks": "0"}, None)]
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'sideways'"):
        best_search_selection(outcomes, "val_accuracy", "sideways")
    with pytest.raises(ValueError, match="metric 'nope' is not reported by any fine-tune trial"):
        best_search_selection(outcomes, "nope", "max")


# 14. A model's own code never runs unless --trust-remote-code is given, and nothing asks.
def _custom_code_model(tiny_llama_dir: Path, folder: Path, marker: Path) -> Path:
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_llama_dir / name).read_bytes())
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(model_type="flexora-custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        "from pathlib import Path\nfrom transformers import LlamaConfig, LlamaModel\n"
        f"Path({str(marker)!r}).touch()\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'flexora-custom'\n\n\n"
        "class CustomModel(LlamaModel):\n    config_class = CustomConfig\n")
    return folder


def test_every_model_command_has_trust_remote_code_off_by_default(capsys):
    from flexora_tune.cli import build_parser

    for command in ("finetune", "search", "compare", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--trust-remote-code" in capsys.readouterr().out
    assert build_parser().parse_args(["export", "s.json"]).trust_remote_code is False


def test_a_models_own_code_does_not_run_even_when_answered_yes(tiny_llama_dir, tmp_path):
    marker = tmp_path / "ran"
    model = _custom_code_model(tiny_llama_dir, tmp_path / "custom", marker)
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"blocks": [1], "num_blocks_total": 4}))
    done = run_cli("export", selection, "--model", model, "--out", tmp_path / "cfg", input="y\ny\ny\n",
                   timeout=60)
    assert done.returncode == 2 and not marker.exists(), done.stderr[-2000:]
    assert "--trust-remote-code" in done.stderr and "[y/N]" not in done.stdout + done.stderr
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([FT, "export", str(selection), "--model", str(model), "--out", str(tmp_path / "cfg"),
                           "--trust-remote-code"], capture_output=True, text=True, timeout=60, env=_env(**env))
    assert done.returncode == 0 and marker.exists(), done.stderr[-2000:]


# 15. Checkpoints hold tensors and plain values only: a pickled object is refused, not run.
class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    import torch

    from flexora_tune.training import load_checkpoint

    torch.save({"meta": {}, "payload": _Payload()}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(tmp_path, "state.pt", "fine-tune")
