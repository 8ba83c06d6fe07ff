"""Tiny models and datasets built from configs, for fast tests with no network."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)

CLASS_WORDS = {"sport": ["goal", "match", "team"], "money": ["bank", "price", "market"]}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "with", "at", "by", "it", "this"]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    words = sorted({*FILLER, *(w for ws in CLASS_WORDS.values() for w in ws), *CLASS_WORDS, *extra_words,
                    "answer", "topic", ":", "\n"})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=128),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=128),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_hidden_layers=3, max_position_embeddings=128),
    "bert": dict(model_type="bert", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=3, max_position_embeddings=128),
    "distilbert": dict(model_type="distilbert", dim=32, hidden_dim=64, n_heads=4, n_layers=3,
                       max_position_embeddings=128),
}


def config(family: str, vocab_size: int, **overrides):
    kwargs = dict(FAMILY_CONFIGS[family])
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**kwargs, **overrides})


def model(family: str, vocab_size: int = 64, **overrides):
    torch.manual_seed(0)
    cfg = config(family, vocab_size, **overrides)
    if family in ("bert", "distilbert"):
        return AutoModel.from_config(cfg)
    return AutoModelForCausalLM.from_config(cfg)


def save_model_dir(path: Path, family: str = "llama", **overrides) -> Path:
    """A local model directory (model + tokenizer), as `save_pretrained` writes it."""
    tok = tokenizer()
    built = model(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **overrides)
    built.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def classification_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Texts of filler words with one class keyword; the keyword decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(CLASS_WORDS)[i % len(CLASS_WORDS)]
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 10))]
        words.insert(rng.randrange(len(words)), rng.choice(CLASS_WORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


class Preempted(Exception):
    """Raised by `save_then_preempt`: a run killed right after it wrote a checkpoint."""


def save_then_preempt(directory: Path):
    """An `on_eval`/`on_step` callback that checkpoints to `directory`, then dies as a preempted trial would."""

    def callback(metrics, save_state) -> None:
        save_state(directory)
        raise Preempted

    return callback


@dataclass
class PointBatch:
    """A regression batch for the planted problems: features `x`, targets `y`; `size` is what searches count."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.y.shape[0])
