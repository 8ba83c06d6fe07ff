"""`ProbeSearcher`: driven by hand (sequencing, waiting, k, equal arms, failures, restores, pickling) and in tiny
real Ray Tune sweeps through the one trainable."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
from ray import tune
from ray.tune.search import Searcher
from searcher_drive import drain

from flexora_tune import ProbeSearcher, trainable
from flexora_tune.blocks import top_k_blocks
from flexora_tune.probes import ProbeResult
from flexora_tune.results import FINETUNE_STEP, PROBE_FILE, PROBE_RANKING, PROBE_SCORES
from flexora_tune.search import decode_layers

SCORES = [0.1, 0.9, 0.3, 0.8, 0.2, 0.05]
L = len(SCORES)


def probe_report(blocks=(1, 3), scores=SCORES, final=True):
    return {"stage": "probe", "strategy": "lora-norm", "seed": 0, "blocks": ",".join(map(str, blocks)),
            "num_blocks_total": len(scores), PROBE_SCORES: list(scores), "final": final, "val_accuracy": -math.inf}


def blocks_of(config):
    return decode_layers(config["layers"]).blocks


def test_probe_first_then_its_top_k_and_the_nearest_subsets_by_score():
    searcher = ProbeSearcher("val_accuracy", "max", probe="lora-norm", k=3, finetunes=3)
    assert searcher.planned_trials == 4
    first = searcher.suggest("p")
    assert {k: first[k] for k in ("stage", "strategy", "probe", "seed", "variant", "top_k")} == {
        "stage": "probe", "strategy": "lora-norm", "probe": "lora-norm", "seed": 0, "variant": "probe0", "top_k": 3}
    assert searcher.suggest("x") is None  # waiting for the probe
    searcher.on_trial_result("p", probe_report((1, 2, 3), final=False))
    assert searcher.suggest("x") is None
    searcher.on_trial_result("p", probe_report((1, 2, 3)))
    finetunes = drain(searcher)
    assert [blocks_of(c) for c in finetunes] == [top_k_blocks(SCORES, 3), (1, 3), (1, 2, 3, 4)]
    assert [c["variant"] for c in finetunes] == ["probe0", "top2", "top4"]
    assert {(c["stage"], c["strategy"], c["seed"]) for c in finetunes} == {("finetune", "lora-norm", 0)}
    searcher.on_trial_complete("p", result=probe_report((1, 2, 3)))
    assert searcher.suggest("late") == Searcher.FINISHED


def test_without_k_the_probe_keeps_its_own_default_and_seeds_repeat_each_subset():
    searcher = ProbeSearcher(probe="grad-norm", seed=2, finetune_seeds=[2, 5])
    config = searcher.suggest("p")
    assert "top_k" not in config and config["seed"] == 2 and config["strategy"] == "grad-norm"
    searcher.on_trial_complete("p", result={**probe_report((1, 3)), "strategy": "grad-norm", "seed": 2})
    finetunes = drain(searcher)
    assert [(blocks_of(c), c["seed"]) for c in finetunes] == [((1, 3), 2), ((1, 3), 5)]


def test_a_failed_probe_contributes_nothing_and_a_restore_rerun_counts():
    failed = ProbeSearcher(k=2)
    failed.suggest("p")
    failed.on_trial_complete("p", result=None, error=True)
    assert failed.suggest("x") == Searcher.FINISHED and failed.outcome is None

    searcher = ProbeSearcher(k=2)
    searcher.suggest("p")
    searcher.on_trial_complete("p", result=probe_report(final=False))  # cut short: no ranking saved
    assert searcher.outcome is None
    searcher.on_trial_result("new-id", {**probe_report(), "strategy": "lora-norm"})  # re-run under a new id
    assert searcher.outcome["blocks"] == (1, 3)
    assert [blocks_of(c) for c in drain(searcher)] == [(1, 3)]


def test_state_pickles_and_restores_mid_sweep(tmp_path):
    searcher = ProbeSearcher(k=2, finetunes=3)
    searcher.suggest("p")
    searcher.on_trial_complete("p", result=probe_report())
    first = searcher.suggest("f0")
    searcher.save(str(tmp_path / "state.pkl"))
    restored = ProbeSearcher(k=2, finetunes=3)
    restored.restore(str(tmp_path / "state.pkl"))
    rest = drain(restored, "g")
    assert [blocks_of(c) for c in [first, *rest]] == [(1, 3), (1,), (1, 2, 3)]
    assert pickle.loads(pickle.dumps(restored)).planned_trials == 4
    with pytest.raises(ValueError, match="probe must be one of"):
        ProbeSearcher(probe="act-norm")
    with pytest.raises(ValueError, match="k must be"):
        ProbeSearcher(k=0)


@pytest.fixture
def base(tiny_llama_dir, tiny_csv):
    return {"model": str(tiny_llama_dir), "task": {"source": str(tiny_csv), "max_length": 32},
            "max_steps": 4, "eval_every": 2, "batch_size": 8, "steps": 4, "report_every": 2, "grad_batches": 2}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_probe_sweeps_probe_then_finetune_through_the_trainable(base, tmp_path):
    searcher = ProbeSearcher("val_accuracy", "max", probe="lora-norm", k=2, finetunes=2)
    analysis = tune.run(trainable, config=base, search_alg=searcher, num_samples=searcher.planned_trials,
                        max_concurrent_trials=2, storage_path=str(tmp_path), verbose=0, reuse_actors=True)
    df = analysis.dataframe()
    probe, finetunes = df[df["stage"] == "probe"], df[df["stage"] == "finetune"]
    assert len(probe) == 1 and len(finetunes) == 2 and set(df["strategy"]) == {"lora-norm"}
    row = probe.iloc[0]
    assert row[FINETUNE_STEP] == 0 and row["val_accuracy"] == -math.inf and row["flops"] > 0 and row["final"]
    assert row["step"] == 4 and len(row[PROBE_SCORES]) == 4 and row["probe"] == "lora-norm"
    selected = top_k_blocks(row[PROBE_SCORES], 2)
    assert row["blocks"] == ",".join(map(str, selected)) and row[PROBE_RANKING][:2] == sorted(
        row[PROBE_RANKING][:2], key=lambda b: -row[PROBE_SCORES][b])
    assert row["report_time"] < finetunes["start_time"].min()  # the probe ran before its fine-tunes
    tuned = dict(zip(finetunes["variant"], finetunes["blocks"], strict=True))
    assert tuned["probe0"] == row["blocks"] and len(set(tuned.values())) == 2
    assert finetunes["final"].all() and (finetunes["val_accuracy"] > -math.inf).all()
    trial = next(t for t in analysis.trials if t.config["stage"] == "probe")
    with trial.checkpoint.as_directory() as directory:
        saved = ProbeResult.from_json((Path(directory) / PROBE_FILE).read_text())
    assert saved.scores == list(row[PROBE_SCORES]) and saved.steps == 4 and saved.probe == "lora-norm"


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_grad_norm_sweep_with_the_probes_default_k_through_a_tuner(base, tmp_path):
    searcher = ProbeSearcher(probe="grad-norm")
    tuner = tune.Tuner(trainable, param_space=base,
                       tune_config=tune.TuneConfig(search_alg=searcher, num_samples=searcher.planned_trials,
                                                   metric="val_accuracy", mode="max", reuse_actors=True),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    df = tuner.fit().get_dataframe()
    probe, finetunes = df[df["stage"] == "probe"].iloc[0], df[df["stage"] == "finetune"]
    assert probe["step"] == 2 and probe["strategy"] == "grad-norm" and probe["flops"] > 0
    assert list(finetunes["blocks"]) == [probe["blocks"]]  # the blocks above the mean score
