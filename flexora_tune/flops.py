"""Training compute in FLOPs: a machine-independent cost axis, computed from the tokens a run processed and
the model's parameter counts (never from timing), so the same settings and data give the same number on any
machine, under any load.

Only matrix multiplications count (the linear layers and attention's two sequence-length products), as in
the usual ``6 N`` rule and in `torch.utils.flop_counter.FlopCounterMode`, against which the tests check
this estimate; elementwise work (norms, activations, the gates, softmax) is left out. For a batch of ``R``
rows padded to ``W`` tokens (``T = R W``: padded tokens, because the hardware computes every position of
the padded batch) and ``A`` answer tokens (causal LM: the positions whose vocabulary logits the loss
computes), with, per block ``l`` of ``L``, ``F_l`` frozen and ``P_l`` trainable (LoRA) matmul weights,
``d`` the attention width (heads x head dim), ``H_f``/``H_t`` the frozen/trainable matmul weights outside
the blocks (a classification head, counted at every position: exact for decoder heads, an upper bound for
pooled heads such as BERT's), ``O`` the output embedding of a causal LM (applied at answer tokens only),
and ``b`` the lowest block with LoRA (autograd stops there: nothing below needs a gradient)::

    forward    = 2 T (sum_l (F_l + P_l) + H_f + H_t) + 4 R W^2 d L + 2 A O
    activation = 2 T (sum_{l>=b} (F_l + P_l) + H_f + H_t) + 8 R W^2 d (L - b) + 2 A O
    weight     = 2 T (sum_l P_l + H_t)

- a LoRA step (every fine-tune step, the search's LoRA step): ``forward + activation + weight``; so frozen
  weights cost 4 FLOPs per weight and token (forward, then activation gradients only), trainable ones 6;
- a first-order gate step: ``forward + activation`` per search-validation batch (gradients reach alpha
  only, no weight gradients);
- the second-order gate step: a LoRA-step's cost per validation batch (it differentiates the weights too),
  plus ``forward + activation`` twice on the training batch (the finite-difference passes, when they run);
- evaluation (`eval_flops`): ``forward`` of every evaluation batch (causal LM: of its loss batch and of its
  choice batch), reported apart from training.

Attention counts the full ``W x W`` score matrix in both products (forward ``4 R W^2 d``, backward twice
that), as eager attention and FlopCounterMode's SDPA formulas do; a causal flash kernel skips about half of
it. Optimizer updates (AdamW: about 12 elementwise operations per trainable parameter per step) do not grow
with the tokens and are left out (below 1% of a step at 8 rows of 16 tokens, far less on real models).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from .blocks import BlockLayout, is_linear
from .objective import batches, encode, encode_choices
from .tasks import Example, TaskKind


@dataclass(frozen=True)
class TokenCount:
    """What one batch makes the model compute: `rows` sequences padded to `width` tokens, and `answers`
    positions scored by an output head applied at answer tokens only (causal-LM losses)."""

    rows: int
    width: int
    answers: int

    @property
    def tokens(self) -> int:
        """Padded tokens: every position the hardware computes."""
        return self.rows * self.width


def batch_tokens(batch: Any) -> TokenCount:
    """The token count of an `objective.Batch` (``input_ids`` rows x padded width; answers: the targets
    after the first position that are not -100, or one per row for class targets). Any other batch counts
    its ``size`` rows of one token each (0 without a size)."""
    input_ids = getattr(batch, "input_ids", None)
    if input_ids is None:
        rows = int(getattr(batch, "size", 0) or 0)
        return TokenCount(rows, 1, rows)
    rows, width = (int(n) for n in input_ids.shape)
    targets = getattr(batch, "targets", None)
    if targets is not None and targets.dim() == 2:
        answers = int((targets[:, 1:] != -100).sum().item())
    else:
        answers = rows
    return TokenCount(rows, width, answers)


def attention_width(config: Any) -> int:
    """Heads x head dimension of a transformers `config` (the width of attention's score products); 0 when
    the config does not say (no attention term)."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(heads, int) or heads < 1:
        return 0
    if not isinstance(head_dim, int) or head_dim < 1:
        if not isinstance(hidden, int) or hidden < 1:
            return 0
        head_dim = hidden // heads
    return heads * head_dim


@dataclass(frozen=True)
class FlopModel:
    """A model's matmul weights by role, from which every pass's FLOPs follow (formula: module docstring).

    `frozen`/`trainable`: weights per block (base layers / LoRA); `head_frozen`/`head_trainable`: matmul
    weights outside the blocks applied at every position; `output`: a causal LM's output embedding, applied
    at answer tokens only; `attention`: each block's attention width (0: no sequence-length term).
    """

    frozen: tuple[int, ...]
    trainable: tuple[int, ...]
    head_frozen: int = 0
    head_trainable: int = 0
    output: int = 0
    attention: int = 0

    @classmethod
    def from_model(cls, model: nn.Module, layout: BlockLayout, kind: TaskKind | None = None) -> FlopModel:
        """Count the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) of a (peft) `model` by block and by
        ``requires_grad`` (so build it while the LoRA and head weights are trainable, before a search
        toggles them). With ``kind="causal_lm"`` the output embedding counts at answer tokens only, as
        `objective.loss_fn` computes it; otherwise at every position. peft's frozen ``original_module``
        copies of a trained head are skipped (they do not run)."""
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        block_re = re.compile(rf"^{re.escape(layout.path)}\.(\d+)\.")
        output_module = None
        if kind == "causal_lm" and hasattr(root, "get_output_embeddings"):
            output_module = root.get_output_embeddings()
        frozen = [0] * layout.num_blocks
        trainable = [0] * layout.num_blocks
        head_frozen = head_trainable = output = 0
        for name, module in root.named_modules():
            if not is_linear(module) or "original_module" in name.split("."):
                continue
            weights, grad = module.weight.numel(), module.weight.requires_grad
            match = block_re.match(name)
            if match is not None and int(match.group(1)) < layout.num_blocks:
                (trainable if grad else frozen)[int(match.group(1))] += weights
            elif output_module is not None and module is output_module:
                output += weights
            elif grad:
                head_trainable += weights
            else:
                head_frozen += weights
        return cls(tuple(frozen), tuple(trainable), head_frozen, head_trainable, output,
                   attention_width(getattr(root, "config", None)))

    @property
    def num_blocks(self) -> int:
        return len(self.frozen)

    @property
    def lowest_trainable(self) -> int:
        """The lowest block with trainable (LoRA) weights; `num_blocks` when none has any."""
        return next((i for i, n in enumerate(self.trainable) if n), self.num_blocks)

    def forward(self, t: TokenCount) -> int:
        """One forward pass."""
        per_token = sum(self.frozen) + sum(self.trainable) + self.head_frozen + self.head_trainable
        attention = 4 * t.rows * t.width**2 * self.attention * self.num_blocks
        return 2 * t.tokens * per_token + attention + 2 * t.answers * self.output

    def activation_grads(self, t: TokenCount) -> int:
        """The backward pass's activation gradients, from the loss down to the lowest LoRA block."""
        low = self.lowest_trainable
        per_token = sum(self.frozen[low:]) + sum(self.trainable[low:]) + self.head_frozen + self.head_trainable
        attention = 8 * t.rows * t.width**2 * self.attention * (self.num_blocks - low)
        return 2 * t.tokens * per_token + attention + 2 * t.answers * self.output

    def weight_grads(self, t: TokenCount) -> int:
        """The backward pass's gradients of the trainable (LoRA and head) weights."""
        return 2 * t.tokens * (sum(self.trainable) + self.head_trainable)

    def train_step(self, t: TokenCount) -> int:
        """A LoRA step: forward, activation gradients, weight gradients."""
        return self.forward(t) + self.activation_grads(t) + self.weight_grads(t)

    def gate_pass(self, t: TokenCount) -> int:
        """A pass that differentiates the gates only: forward and activation gradients."""
        return self.forward(t) + self.activation_grads(t)


def eval_flops(
    flop_model: FlopModel,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    kind: TaskKind,
    max_length: int,
    batch_size: int,
) -> int:
    """The forward FLOPs of `objective.evaluate` on `examples`, batch by batch as it encodes them: the loss
    batch, and for a causal LM also the batch of every (example, choice) row."""
    total = 0
    for chunk in batches(examples, batch_size):
        total += flop_model.forward(batch_tokens(encode(chunk, tokenizer, kind, max_length)))
        if kind != "classification":
            total += flop_model.forward(batch_tokens(encode_choices(chunk, tokenizer, max_length)))
    return total
