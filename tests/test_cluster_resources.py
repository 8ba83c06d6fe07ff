"""Trial memory estimates (flexora_tune.resources): hand-computed numbers, the GPU fraction, and a check of
the activation term against the tensors autograd really saves on a small model (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from flexora_tune.resources import GB, MemoryEstimate, estimate_trial_memory, gpus_per_trial


def test_estimate_matches_hand_computed_numbers():
    # A 1B model: h=2048, 16 blocks, MLP 5632, bf16, LoRA r=8 on 2 modules of every block, batch 8 x 512.
    e = estimate_trial_memory(num_params=1_000_000_000, hidden_size=2048, num_blocks=16, intermediate_size=5632,
                              lora_rank=8, seq_len=512, batch_size=8, eval_batch_size=1, dtype="bfloat16")
    assert e.weights == 2_000_000_000  # 1e9 params x 2 bytes
    assert e.lora_params == 16 * 2 * 8 * (2048 + 2048) == 1_048_576  # blocks x modules x r x (in + out)
    assert e.lora == 1_048_576 * 16  # weight, grad, AdamW m and v, float32
    # per token and block: norms 16h + q/k/v/out 2(2h + 2h) + MLP 2 x 3 x 5632 + LoRA inputs 4 x 2h
    per_token_block = 16 * 2048 + 2 * 4 * 2048 + 2 * 3 * 5632 + 4 * 2 * 2048
    assert per_token_block == 99_328
    assert e.activations == 8 * 512 * 16 * per_token_block == 6_509_559_808
    assert e.workspace == 512 * 1024**2 + int(0.1 * (e.weights + e.lora + e.activations))
    assert e.total == e.weights + e.lora + e.activations + e.workspace
    assert e.breakdown_gb()["total"] == pytest.approx(e.total / GB, abs=1e-3) and "GiB" in str(e)


def test_search_fewer_adapted_blocks_and_causal_lm_heads():
    base = dict(num_params=10**9, hidden_size=2048, num_blocks=16, seq_len=512, batch_size=8, eval_batch_size=1)
    finetune = estimate_trial_memory(**base)
    search = estimate_trial_memory(**base, stage="search")
    fewer = estimate_trial_memory(**base, num_adapted_blocks=4)
    assert search.lora == finetune.lora + 16 * 16  # plus one gate a block (with its Adam state)
    assert search.activations == finetune.activations + 8 * 512 * 16 * 2 * 2048  # gated block outputs
    assert fewer.lora_params == finetune.lora_params // 4 and fewer.activations < finetune.activations
    lm = estimate_trial_memory(**base, head="causal_lm", vocab_size=32_000)
    assert lm.activations - finetune.activations == 8 * 512 * 32_000 * (2 + 4 + 4)  # logits, fp32 copy, grad
    with pytest.raises(ValueError, match="vocab_size"):
        estimate_trial_memory(**base, head="causal_lm")
    with pytest.raises(ValueError, match="num_params"):
        estimate_trial_memory(hidden_size=64)
    with pytest.raises(ValueError, match="dtype"):
        estimate_trial_memory(**base, dtype="int3")


def test_gpus_per_trial_packs_fractions_that_fit():
    def of(gb: float) -> MemoryEstimate:
        return MemoryEstimate(weights=int(gb * GB), lora=0, activations=0, workspace=0, lora_params=0,
                              num_params=0, stage="finetune")

    assert gpus_per_trial(of(30), 80) == 0.5  # 72 usable / 30 -> 2 trials
    assert gpus_per_trial(of(20), 80) == 0.3333  # 3 trials; 3 x 0.3333 <= 1
    assert gpus_per_trial(of(17), 80) == 0.25
    assert gpus_per_trial(of(60), 80) == 1.0
    assert gpus_per_trial(0.1, 80) == 0.125  # at most 8 trials a GPU
    with pytest.raises(ValueError, match="larger GPU"):
        gpus_per_trial(of(79), 80)


def test_model_sizes_come_from_its_config_and_lora_count_matches_peft(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    e = estimate_trial_memory(str(tiny_llama_dir), seq_len=32)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert e.lora_params == lora  # exact: q 32->32, v 32->16 (GQA) per block, r=8
    assert e.num_params == pytest.approx(sum(p.numel() for p in model.base_model.parameters()), rel=0.2)


def test_activation_estimate_is_close_to_what_autograd_saves(tmp_path):
    """Sum the bytes autograd keeps for backward in one training forward pass of a small Llama with LoRA
    (float32 on CPU) and compare with the estimate's activation term."""
    import tiny
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    path = tiny.save_model_dir(tmp_path / "m", "llama", hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    batch, seq = 8, 64
    ids = torch.randint(4, 30, (batch, seq), generator=torch.Generator().manual_seed(0))
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    estimate = estimate_trial_memory(str(path), seq_len=seq, batch_size=batch, eval_batch_size=1, dtype="float32")
    assert 0.8 < estimate.activations / saved < 1.6, (estimate.activations, saved)
