"""How much GPU memory one trial needs, and how many trials to pack on a GPU.

Ray schedules trials by declared resources only (``{"gpu": 0.5}`` packs two trials on a GPU) and never
checks memory, so an over-packed GPU fails with CUDA out-of-memory errors. `estimate_trial_memory` gives a
trial's peak from the model's size, the LoRA rank, the sequence length and the batch, with a breakdown, and
`gpus_per_trial` turns it into the GPU fraction to pass as ``--gpus-per-trial``. The estimate is an
engineering upper bound (±30%), not a measurement: check one trial with ``nvidia-smi`` before a big sweep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

GB = 1024**3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
ADAPTER_BYTES = 4  # peft keeps LoRA weights in float32 even on a bf16/fp16 base model
LORA_STATE_PER_PARAM = 4 * ADAPTER_BYTES  # weight + grad + AdamW exp_avg + exp_avg_sq, all float32
CUDA_CONTEXT_BYTES = 512 * 1024**2  # per process: CUDA context, cuBLAS/cuDNN handles
FRAGMENTATION = 0.10  # PyTorch caching-allocator slack on top of live tensors
Stage = Literal["finetune", "search"]
Head = Literal["classification", "causal_lm"]


@dataclass(frozen=True)
class MemoryEstimate:
    """A trial's estimated peak GPU memory, in bytes, by part.

    - `weights`: the frozen base model in `dtype`;
    - `lora`: LoRA parameters, their gradients and AdamW's two moments (float32: 16 bytes a parameter),
      plus the Flexora gates in a search;
    - `activations`: the larger of the training step (tensors saved for backward, through every block,
      plus the output logits) and an evaluation batch (no grad);
    - `workspace`: the CUDA context and cuBLAS workspaces plus allocator fragmentation.
    """

    weights: int
    lora: int
    activations: int
    workspace: int
    lora_params: int
    num_params: int
    stage: str

    @property
    def total(self) -> int:
        """Estimated peak, bytes."""
        return self.weights + self.lora + self.activations + self.workspace

    @property
    def total_gb(self) -> float:
        """Estimated peak, GiB."""
        return self.total / GB

    def breakdown_gb(self) -> dict[str, float]:
        """Each part and the total in GiB, rounded to 3 decimals (for tables and logs)."""
        parts = {k: v for k, v in asdict(self).items() if k in ("weights", "lora", "activations", "workspace")}
        return {**{k: round(v / GB, 3) for k, v in parts.items()}, "total": round(self.total_gb, 3)}

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.breakdown_gb().items() if k != "total")
        return f"{self.stage} trial ~{self.total_gb:.2f} GiB ({parts})"


@dataclass(frozen=True)
class _Shape:
    num_params: int
    hidden_size: int
    num_blocks: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    kv_dim: int
    lora_params_per_block_per_rank: int | None  # exact, when the model's target modules are known


def _first_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _shape_of(model: str, head: Head, target_modules: tuple[str, ...] | None) -> _Shape:
    """Read the sizes from the model's config and a meta-device skeleton (no weights loaded)."""
    from .blocks import find_blocks
    from .models import meta_skeleton

    skeleton = meta_skeleton(model, head)
    config = skeleton.config
    hidden = _first_int(config, "hidden_size", "n_embd", "dim", "d_model")
    if hidden is None:
        raise ValueError(f"cannot read the hidden size of {model!r} from its config; pass hidden_size=")
    heads = _first_int(config, "num_attention_heads", "n_head", "n_heads") or 1
    kv_heads = _first_int(config, "num_key_value_heads") or heads
    layout = find_blocks(skeleton)
    blocks = dict(skeleton.named_modules())[layout.path]
    targets = set(target_modules or layout.target_modules)
    per_rank = 0
    for name, module in blocks[0].named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            shape = tuple(module.weight.shape)  # Linear: (out, in); GPT-2 Conv1D: (in, out)
            per_rank += shape[0] + shape[1]
    return _Shape(
        num_params=sum(p.numel() for p in skeleton.parameters()), hidden_size=hidden,
        num_blocks=layout.num_blocks,
        intermediate_size=_first_int(config, "intermediate_size", "n_inner", "hidden_dim") or 4 * hidden,
        vocab_size=_first_int(config, "vocab_size") or 0, num_heads=heads, kv_dim=hidden * kv_heads // heads,
        lora_params_per_block_per_rank=per_rank or None,
    )


def estimate_trial_memory(
    model: str | None = None,
    *,
    num_params: int | None = None,
    hidden_size: int | None = None,
    num_blocks: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    lora_rank: int = 8,
    seq_len: int = 256,
    batch_size: int = 8,
    eval_batch_size: int = 32,
    dtype: str = "bfloat16",
    stage: Stage = "finetune",
    num_adapted_blocks: int | None = None,
    target_modules_per_block: int = 2,
    head: Head = "classification",
    attention: Literal["sdpa", "eager"] = "sdpa",
) -> MemoryEstimate:
    """Estimate one trial's peak GPU memory, so that `gpus_per_trial` can pack trials safely.

    Give `model` (an HF id, a local directory or ``"default"``: its config is read, no weights are loaded)
    or its sizes: `num_params`, `hidden_size`, `num_blocks` (and optionally `intermediate_size`, default
    4 x hidden, and `vocab_size`, needed for ``head="causal_lm"``); explicit sizes override the model's.
    `seq_len` is the task's token cut-off (``--max-length``), `batch_size`/`eval_batch_size` the fine-tune's.
    A ``"search"`` trial (Flexora stage 1) puts LoRA and a gate on every block; a ``"finetune"`` trial puts
    LoRA on `num_adapted_blocks` (default: all, the worst case). Without `model`, each of the
    `target_modules_per_block` LoRA targets is taken as hidden x hidden (r x 2h parameters).

    Activations count, per token and block, what autograd saves for the backward pass: two norms (float32
    copies), q/k/v and the attention output, three MLP intermediates and the float32 LoRA inputs, plus the
    attention probabilities with ``attention="eager"``; backward runs down to the lowest adapted block, so
    every block is counted. A causal-LM head adds the logits (in `dtype`, their float32 copy and its
    gradient). Gradient checkpointing, which this package does not use, would cut activations to about one
    block's worth.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}")
    if stage not in ("finetune", "search"):
        raise ValueError(f"stage must be 'finetune' or 'search', got {stage!r}")
    if head not in ("classification", "causal_lm"):
        raise ValueError(f"head must be 'classification' or 'causal_lm', got {head!r}")
    for name, value in (("lora_rank", lora_rank), ("seq_len", seq_len), ("batch_size", batch_size),
                        ("eval_batch_size", eval_batch_size), ("target_modules_per_block", target_modules_per_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    shape = _shape_of(model, head, None) if model is not None else None
    num_params = num_params or (shape.num_params if shape else None)
    hidden = hidden_size or (shape.hidden_size if shape else None)
    blocks = num_blocks or (shape.num_blocks if shape else None)
    if not (num_params and hidden and blocks):
        raise ValueError("give a model, or num_params, hidden_size and num_blocks")
    inter = intermediate_size or (shape.intermediate_size if shape else 4 * hidden)
    vocab = vocab_size or (shape.vocab_size if shape else 0)
    if head == "causal_lm" and not vocab:
        raise ValueError("a causal-LM head needs vocab_size (or a model)")
    kv_dim = shape.kv_dim if shape and not hidden_size else hidden
    heads = shape.num_heads if shape else max(1, hidden // 64)
    adapted = blocks if stage == "search" else (num_adapted_blocks or blocks)
    if not 1 <= adapted <= blocks:
        raise ValueError(f"num_adapted_blocks must be in 1..{blocks}, got {num_adapted_blocks}")
    elem = DTYPE_BYTES[dtype]

    per_rank = shape.lora_params_per_block_per_rank if shape and not hidden_size else None
    per_rank = per_rank or target_modules_per_block * 2 * hidden
    lora_params = adapted * lora_rank * per_rank
    gates = blocks if stage == "search" else 0
    lora = (lora_params + gates) * LORA_STATE_PER_PARAM

    tokens = batch_size * seq_len
    per_token_block = 2 * 2 * 4 * hidden + elem * (2 * hidden + 2 * kv_dim) + elem * 3 * inter
    per_token_block += ADAPTER_BYTES * hidden * target_modules_per_block * adapted / blocks
    if stage == "search":
        per_token_block += elem * hidden  # the gated block output
    if attention == "eager":
        per_token_block += 2 * elem * heads * seq_len  # scores and softmax probabilities
    logits = tokens * vocab * (elem + 4 + 4) if head == "causal_lm" else 0
    train = int(tokens * blocks * per_token_block) + logits
    eval_tokens = eval_batch_size * seq_len
    evaluation = eval_tokens * (vocab * (elem + 4) if head == "causal_lm" else 2 * elem * (inter + hidden))
    activations = max(train, evaluation)

    weights = num_params * elem
    workspace = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * (weights + lora + activations))
    return MemoryEstimate(weights=weights, lora=lora, activations=activations, workspace=workspace,
                          lora_params=lora_params, num_params=num_params, stage=stage)


def gpus_per_trial(estimate: MemoryEstimate | float, gpu_memory_gb: float, *, headroom: float = 0.9,
                   max_trials_per_gpu: int = 8) -> float:
    """The GPU fraction for ``--gpus-per-trial``: 1, 1/2, 1/3, ... so that that many trials fit in
    `headroom` of one GPU's `gpu_memory_gb` (an estimate, or its total in GiB).

    Raises `ValueError` when one trial does not fit on one GPU: this package trains a trial on a single
    device, so use a smaller batch or sequence length, or a larger GPU. Fractions are rounded down to
    Ray's 4-decimal precision (1/3 -> 0.3333), so n trials never ask for more than the whole GPU.
    """
    need = estimate.total_gb if isinstance(estimate, MemoryEstimate) else float(estimate)
    if gpu_memory_gb <= 0 or not 0 < headroom <= 1 or need <= 0:
        raise ValueError("gpu_memory_gb and the estimate must be positive, headroom in (0, 1]")
    usable = gpu_memory_gb * headroom
    if need > usable:
        raise ValueError(f"a trial needs ~{need:.1f} GiB but {headroom:.0%} of a {gpu_memory_gb:g} GiB GPU is "
                         f"{usable:.1f} GiB: lower --batch-size or --max-length, or use a larger GPU")
    n = min(max_trials_per_gpu, math.floor(usable / need))
    return math.floor(10_000 / n) / 10_000
