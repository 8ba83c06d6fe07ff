"""Turning examples into batches, the training loss, and accuracy, for both task kinds.

Causal-LM losses and choice scores compute vocabulary logits only at the answer positions: a full
logits tensor at every position costs several times the rest of a small model's step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from .tasks import Example, TaskKind


@dataclass
class Batch:
    """Token ids, attention mask and targets: class labels (classification) or per-token targets with
    -100 on the prompt (causal LM)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def _pad(rows: Sequence[list[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    width = max(len(r) for r in rows)
    value = pad_id if fill is None else fill
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _prompt_answer_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, max_length: int
) -> tuple[list[int], list[int]]:
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max_length - 1]
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    keep = max(1, max_length - len(answer_ids))
    return prompt_ids[:keep], answer_ids


def encode(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, kind: TaskKind, max_length: int
) -> Batch:
    """A training batch: classification inputs with class targets, or prompt+answer with the prompt masked."""
    pad = tokenizer.pad_token_id
    if kind == "classification":
        ids = [tokenizer(ex.text, truncation=True, max_length=max_length)["input_ids"] for ex in examples]
        input_ids = _pad(ids, pad)
        mask = _pad([[1] * len(r) for r in ids], 0)
        return Batch(input_ids, mask, torch.tensor([ex.label for ex in examples], dtype=torch.long))
    rows, targets = [], []
    for ex in examples:
        prompt_ids, answer_ids = _prompt_answer_ids(tokenizer, ex.text, ex.answer, max_length)
        rows.append(prompt_ids + answer_ids)
        targets.append([-100] * len(prompt_ids) + answer_ids)
    return Batch(_pad(rows, pad), _pad([[1] * len(r) for r in rows], 0), _pad(targets, pad, fill=-100))


def encode_choices(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Batch:
    """One row per (example, choice), in example order, for multiple-choice scoring."""
    rows, targets = [], []
    for ex in examples:
        for choice in ex.choices or ():
            prompt_ids, answer_ids = _prompt_answer_ids(tokenizer, ex.text, choice, max_length)
            rows.append(prompt_ids + answer_ids)
            targets.append([-100] * len(prompt_ids) + answer_ids)
    pad = tokenizer.pad_token_id
    return Batch(_pad(rows, pad), _pad([[1] * len(r) for r in rows], 0), _pad(targets, pad, fill=-100))


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _answer_token_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each answer token, and the row each belongs to."""
    hf = _hf_model(model)
    hidden = hf.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    shifted = batch.targets[:, 1:]
    rows, cols = (shifted != -100).nonzero(as_tuple=True)
    logits = hf.get_output_embeddings()(hidden[rows, cols]).float()
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, shifted[rows, cols].unsqueeze(1)).squeeze(1)
    return token_logprobs, rows


def loss_fn(model: nn.Module, batch: Batch, kind: TaskKind) -> torch.Tensor:
    """Mean cross-entropy: over examples (classification) or over answer tokens (causal LM)."""
    if kind == "classification":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits.float(), batch.targets)
    token_logprobs, _ = _answer_token_logprobs(model, batch)
    return -token_logprobs.mean()


def batches(examples: Sequence[Example], batch_size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(examples), batch_size):
        yield examples[start : start + batch_size]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    kind: TaskKind,
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Accuracy and mean loss. Causal-LM accuracy scores every choice by its summed log-likelihood and
    takes the best one, as multiple-choice benchmarks (HellaSwag, PIQA) are scored."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for chunk in batches(examples, batch_size):
        batch = encode(chunk, tokenizer, kind, max_length).to(device)
        if kind == "classification":
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            loss_sum += F.cross_entropy(logits, batch.targets, reduction="sum").item()
            correct += (logits.argmax(-1) == batch.targets).sum().item()
            continue
        loss_sum += loss_fn(model, batch, kind).item() * len(chunk)
        scored = encode_choices(chunk, tokenizer, max_length).to(device)
        token_logprobs, rows = _answer_token_logprobs(model, scored)
        choice_scores = torch.zeros(scored.size, device=device).index_add_(0, rows, token_logprobs.float())
        offset = 0
        for ex in chunk:
            n = len(ex.choices or ())
            correct += int(choice_scores[offset : offset + n].argmax().item() == ex.label)
            offset += n
    model.train(was_training)
    n = max(1, len(examples))
    return {"accuracy": correct / n, "loss": loss_sum / n}
