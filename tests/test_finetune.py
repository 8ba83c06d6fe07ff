"""Fine-tuning fresh LoRA on a block subset: learning, reproducibility, resume, and bad input."""

from __future__ import annotations

import math

import pytest
import tiny

from flexora_tune import ModelNotFoundError, finetune
from flexora_tune.finetune import STATE_FILE


def _task(csv, **overrides):
    return {"source": str(csv), "max_length": 32, **overrides}


def test_finetune_lowers_training_loss_and_reports_its_metrics(tiny_llama_dir, tiny_csv):
    result = finetune(str(tiny_llama_dir), _task(tiny_csv), blocks=[1, 3], seed=0, epochs=3, lr=1e-2)
    first, last = result.history[0], result.history[-1]
    assert len(result.history) == 3 and last["train_loss"] < first["train_loss"]
    assert last["test_eval_s"] > 0 and last["compute_s"] > 0  # test evaluation is timed apart
    assert last["train_loss"] < math.log(2)
    assert result.blocks == [1, 3] and result.num_blocks == 2 and result.num_blocks_total == 4
    assert result.trainable_params > 0 and result.compute_s > 0 and result.examples_seen == 3 * 120
    assert 0 <= result.val_accuracy <= 1 and 0 <= result.test_accuracy <= 1


def test_fewer_blocks_train_fewer_parameters(tiny_llama_dir, tiny_csv):
    one = finetune(str(tiny_llama_dir), _task(tiny_csv), blocks=[0], max_steps=1)
    every = finetune(str(tiny_llama_dir), _task(tiny_csv), blocks=None, max_steps=1)
    head = one.trainable_params - (every.trainable_params - one.trainable_params) / 3
    assert every.num_blocks == 4 and every.trainable_params > one.trainable_params
    assert head > 0


def test_same_seed_same_numbers_and_other_seed_differs(tiny_llama_dir, tiny_csv):
    kwargs = dict(blocks=[0, 2], epochs=1, lr=1e-2)
    a = finetune(str(tiny_llama_dir), _task(tiny_csv), seed=3, **kwargs)
    b = finetune(str(tiny_llama_dir), _task(tiny_csv), seed=3, **kwargs)
    c = finetune(str(tiny_llama_dir), _task(tiny_csv), seed=4, **kwargs)
    assert (a.train_loss, a.val_loss) == (b.train_loss, b.val_loss)
    assert a.train_loss != c.train_loss


def test_resume_from_saved_state_matches_the_uninterrupted_run(tiny_llama_dir, tiny_csv, tmp_path):
    kwargs = dict(blocks=[1, 2], seed=1, epochs=2, lr=1e-2)
    full = finetune(str(tiny_llama_dir), _task(tiny_csv), **kwargs)

    with pytest.raises(tiny.Preempted):
        finetune(str(tiny_llama_dir), _task(tiny_csv), on_eval=tiny.save_then_preempt(tmp_path / "ckpt"), **kwargs)
    assert (tmp_path / "ckpt" / STATE_FILE).exists()
    resumed = finetune(str(tiny_llama_dir), _task(tiny_csv), resume_from=tmp_path / "ckpt", **kwargs)
    assert resumed.val_loss == full.val_loss and resumed.train_loss == full.train_loss
    assert [h["step"] for h in resumed.history] == [15, 30]


def test_causal_lm_finetune_learns_the_answer_and_scores_choices(tmp_path):
    """A wider weight init than the default 0.02 lets a 32-wide model express confident next-token logits."""
    model_dir = tiny.save_model_dir(tmp_path / "llama", "llama", initializer_range=0.2)
    rows = [{"prompt": r["text"], "answer": r["label"]} for r in tiny.classification_rows(120)]
    task = {"source": str(tiny.write_csv(tmp_path / "qa.csv", rows)), "max_length": 32}
    result = finetune(str(model_dir), task, blocks=[0, 1, 2, 3], epochs=4, lr=2e-2, seed=0)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.val_accuracy >= 0.75


def test_bad_inputs_get_clear_errors(tiny_llama_dir, tiny_csv, tmp_path):
    with pytest.raises(ValueError, match=r"out of range.*0\.\.3"):
        finetune(str(tiny_llama_dir), _task(tiny_csv), blocks=[7])
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        finetune(str(tiny_llama_dir), _task(tiny_csv), learning_rate=1e-3)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        finetune("./no/such/model", _task(tiny_csv))
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        finetune(str(tmp_path / "empty_model"), _task(tiny_csv))
    with pytest.raises(ModelNotFoundError, match="cannot load model"):
        finetune("no-such-org/no-such-model-xyz", _task(tiny_csv))
    with pytest.raises(ValueError, match=r"target modules \['wq'\] are not linear layers"):
        finetune(str(tiny_llama_dir), _task(tiny_csv), target_modules=["wq"])
    with pytest.raises(ValueError, match="lr must be a positive number"):
        finetune(str(tiny_llama_dir), _task(tiny_csv), lr=0)


def test_nan_loss_stops_with_the_step_and_a_fix(tiny_llama_dir, tiny_csv):
    with pytest.raises(FloatingPointError, match=r"at step \d+: lower the learning rate"):
        finetune(str(tiny_llama_dir), _task(tiny_csv), lr=1e30, epochs=2)


def _final_state(directory):
    """An `on_eval` callback that checkpoints after every evaluation, so the last one holds the final state."""

    def callback(metrics, save_state) -> None:
        save_state(directory)

    return callback


def test_resumed_finetune_is_bit_identical_to_the_uninterrupted_run(tiny_llama_dir, tiny_csv, tmp_path):
    """Dropout on, so the restored random state matters: weights, optimizer state and metrics all match."""
    import torch

    kwargs = dict(blocks=[0, 3], seed=2, epochs=3, lr=1e-2, lora_dropout=0.3)
    full = finetune(str(tiny_llama_dir), _task(tiny_csv), on_eval=_final_state(tmp_path / "full"), **kwargs)
    with pytest.raises(tiny.Preempted):
        finetune(str(tiny_llama_dir), _task(tiny_csv), on_eval=tiny.save_then_preempt(tmp_path / "cut"), **kwargs)
    resumed = finetune(str(tiny_llama_dir), _task(tiny_csv), resume_from=tmp_path / "cut",
                       on_eval=_final_state(tmp_path / "resumed"), **kwargs)
    a = torch.load(tmp_path / "full" / STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=True)
    assert a["weights"].keys() == b["weights"].keys() and a["weights"]
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizers"]["optimizer"]["state"][0].values(),
                                                   b["optimizers"]["optimizer"]["state"][0].values(), strict=True))
    untimed = [{k: v for k, v in h.items() if not k.endswith("_s")} for h in full.history]
    assert [{k: v for k, v in h.items() if not k.endswith("_s")} for h in resumed.history] == untimed
    assert (resumed.val_loss, resumed.test_accuracy) == (full.val_loss, full.test_accuracy)


def test_resume_refuses_a_checkpoint_of_another_run(tiny_llama_dir, tiny_csv, tmp_path):
    with pytest.raises(tiny.Preempted):
        finetune(str(tiny_llama_dir), _task(tiny_csv), blocks=[1], epochs=2,
                 on_eval=tiny.save_then_preempt(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"has blocks=\[1\] but this fine-tune has blocks=\[2\]"):
        finetune(str(tiny_llama_dir), _task(tiny_csv), blocks=[2], epochs=2, resume_from=tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no fine-tune state at"):
        finetune(str(tiny_llama_dir), _task(tiny_csv), blocks=[1], epochs=2, resume_from=tmp_path / "nothing")
