"""`flexora-tune compare` end to end on a tiny model through the CLI, and `report` from saved results alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from flexora_tune.cli import main

TRIAL_COLUMNS = {"strategy", "seed", "arm", "stage", "blocks", "num_blocks", "trainable_params", "val_accuracy",
                 "test_accuracy", "compute_s", "node", "status"}


@pytest.fixture(scope="module")
def compared(ray_session, tiny_llama_dir, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    code = main([
        "compare", "--model", str(tiny_llama_dir), "--task", str(tiny_csv), "--max-length", "32",
        "--strategies", "flexora,random,all", "--seeds", "1", "--trials", "2", "--max-steps", "6",
        "--lr", "1e-2", "--search-steps", "4", "--searches", "2", "--alpha-lr", "0.05", "--out", str(out),
    ])
    assert code == 0
    return out


def test_compare_writes_trials_summary_plots_and_the_export(compared):
    trials = pd.read_csv(compared / "trials.csv")
    assert TRIAL_COLUMNS <= set(trials.columns)
    assert set(trials.strategy) == {"flexora", "random", "all"}
    flexora = trials[trials.strategy == "flexora"]
    assert sorted(flexora.stage) == ["finetune", "finetune", "search", "search"]  # --searches 2, then --trials 2
    assert list(flexora[flexora.stage == "finetune"].variant)[0] == "consensus"
    meta = json.loads((compared / "meta.json").read_text())
    assert meta["searches"] == 2 and meta["settings"]["search"]["alpha_lr"] == 0.05
    assert len(trials[trials.strategy == "random"]) == 2 and len(trials[trials.strategy == "all"]) == 1
    assert (trials.status == "TERMINATED").all() and (trials.arm == trials.strategy + "_seed0").all()
    assert trials[trials.stage == "search"].val_accuracy.isna().all()  # no placeholder where nothing was measured
    assert [p.name for p in (compared / "ray").iterdir() if p.is_dir()] == ["comparison"]  # one experiment
    summary = pd.read_csv(compared / "summary.csv")
    assert sorted(summary.strategy[summary.kind == "strategy"]) == ["all", "flexora", "random"]
    for png in ("best_so_far.png", "block_map.png", "gates_heatmap.png"):
        assert (compared / png).stat().st_size > 5_000
    best = json.loads((compared / "best_selection.json").read_text())
    finetunes = trials[trials.stage == "finetune"]
    assert best["val_accuracy"] == pytest.approx(finetunes.val_accuracy.max())
    config = json.loads((compared / "best_lora_config" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == best["blocks"] and config["layers_pattern"] == "layers"


def test_report_rebuilds_summary_and_plots_from_trials_csv_alone(compared, tmp_path, capsys):
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("trials.csv", "meta.json", "search_trajectories.json", "floors.json"):
        (saved / name).write_bytes((compared / name).read_bytes())
    assert main(["report", str(saved)]) == 0
    assert pd.read_csv(saved / "summary.csv").equals(pd.read_csv(compared / "summary.csv"))
    assert {"best_so_far.png", "block_map.png", "gates_heatmap.png", "best_selection.json"} <= {
        p.name for p in saved.iterdir()}
    assert "flexora" in capsys.readouterr().out


def test_bad_arguments_exit_non_zero_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--strategies", "flexora,magic"])
    assert exc.value.code == 2 and "unknown strategies ['magic']" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "trials.csv" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path / "missing"), "--blocks", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_subcommand_has_complete_help(capsys):
    for command in ("compare", "report", "search", "finetune", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert f"usage: flexora-tune {command}" in text and "--" in text


def test_export_writes_a_peft_adapter_config(tiny_llama_dir, tmp_path):
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"blocks": [1, 3], "num_blocks_total": 4}))
    assert main(["export", str(selection), "--model", str(tiny_llama_dir), "--out", str(tmp_path / "cfg")]) == 0
    config = json.loads((tmp_path / "cfg" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1, 3] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_search_then_finetune_the_written_selection(tiny_llama_dir, tiny_csv, tmp_path, capsys):
    from flexora_tune import SelectionResult

    selection = tmp_path / "selection.json"
    common = ["--model", str(tiny_llama_dir), "--task", str(tiny_csv), "--max-length", "32", "--lr", "1e-2"]
    sized = ["--max-train-examples", "32", "--epochs", "1", "--search-max-length", "16", "--stop-when-stable", "0"]
    with pytest.warns(UserWarning, match="only 4 steps"):  # one pass over the fine-tune's 32 examples
        assert main(["search", *common, *sized, "--out", str(selection)]) == 0
    found = SelectionResult.from_json(selection.read_text())
    assert found.num_blocks_total == 4 and found.steps == found.planned_steps == 4
    assert found.settings["search_max_length"] == 16 and found.settings["stop_when_stable"] is None
    out = tmp_path / "finetune.json"
    assert main(["finetune", *common, "--selection", str(selection), "--max-steps", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["blocks"] == list(found.blocks)


def test_a_bad_setting_fails_before_any_trial_runs(tiny_llama_dir, tiny_csv, tmp_path):
    from flexora_tune.compare import compare

    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['max_length'\]"):
        compare(out=tmp_path, model=str(tiny_llama_dir), task=str(tiny_csv), settings={"max_length": 32})
    with pytest.raises(ValueError, match="unknown strategies"):
        compare(out=tmp_path, strategies=("flexora", "grid"))
