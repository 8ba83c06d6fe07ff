"""GPU benchmark: throughput, peak memory and matmul utilisation of a Flexora search step (first-order, and
optionally second-order) against a plain LoRA step, on a Llama-architecture model at realistic width.

The model has Llama-3-8B's width (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocabulary 128256)
with fewer blocks (default 8) and random weights, in bf16; LoRA r 8 on q_proj/v_proj of every block (the
method's reference). The batch is synthetic: random token ids, `--batch-size` rows of `--seq-len` tokens,
the loss on the last `--answer-tokens` tokens of each row (causal-LM loss with the prompt masked, vocabulary
logits only at the answer positions, as `flexora_tune.objective.loss_fn` computes it). The same batch serves
as the validation batch, so the search step's extra cost is only the extra work.

The step types are interleaved (plain, first-order[, second-order], plain, ...), each timed with CUDA
synchronisation, after `--warmup` rounds. Peak memory: `torch.cuda.max_memory_allocated` during the step
(reset before it), and the same minus what was allocated before the step (weights, LoRA, optimizer state).

FLOPs (matmuls only; stated so the utilisation can be checked). Per token, with N = weights of the blocks'
linear layers (frozen), N_lora = LoRA weights, L blocks, d = hidden size, S = sequence length, and causal
attention counted as half of the full S x S products:
  forward             2 N + 2 N_lora + 2 S d L               (projections; Q K^T and A V: 2 * 2 S d L / 2)
  backward, LoRA step 2 N + 4 N_lora + 4 S d L               (activation grads only for frozen weights: one
                                                              matmul per linear, no weight grads; the LoRA
                                                              weights get both; attention backward = 2x fwd)
plus the LM head on the answer tokens only: 2 d V forward, 4 d V backward (dX, and no dW: the head is frozen;
counted as 2 d V) per answer token. A plain LoRA step is forward + backward on the training batch; a first-
order search step is that plus forward + backward of the validation batch to alpha (LoRA weights frozen there:
2 N_lora instead of 4 N_lora in backward). Utilisation = FLOPs / step time / (`--peak-tflops` * 1e12); the
default 989 is the dense bf16 peak of an H100/H200 SXM.

Reused trial workers (`--reuse-check`, on by default; ``only`` skips the step benchmark): a Llama of the same
width (`--layers` blocks, the tests' word-level vocabulary) is saved with save_pretrained, then fine-tuned several
times in this process through `flexora_tune.finetune` with the per-process model cache, as a reused Ray worker
does: trials of the same model, one of another model (another head size: another cache key, which evicts the
first), then the first again, each followed by `release_trial_memory()`. After every trial
`torch.cuda.memory_allocated()` must be back at the cached model's footprint (`cached_model_bytes`) plus a
constant (cuBLAS workspaces and the like, measured by the same trial without the cache), with no copy of a
trial's model still alive; it also times a load from disk against a copy of the cached model, and compares a
trial's numbers with and without the cache.

It needs torch, transformers and peft only (no Ray): it imports flexora_tune.flexora, .blocks, .gates,
.objective, .models and .finetune, which are Ray-free, and checks that Ray was not imported.

    python benchmarks/gpu.py                                  # on a CUDA node; writes to $OUT or results/
    python benchmarks/gpu.py --layers 4 --seq-len 2048 --second-order
    python benchmarks/gpu.py --device cpu --tiny              # smoke test on a CPU
    python benchmarks/gpu.py --reuse-check only               # only the reused-worker memory check
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    RESULTS,
    command_line,
    fmt,
    header_markdown,
    machine_info,
    markdown_table,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    write_json,
)

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """The model and batch shape."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch_size: int
    seq_len: int
    answer_tokens: int


def build_model(shape: Shape, device: Any, dtype: Any, seed: int = 0):
    """A randomly initialised Llama causal LM of `shape`, with LoRA (r 8, q_proj/v_proj) on every block."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flexora_tune.blocks import BlockSelection, attach_lora, find_blocks

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(2048, shape.seq_len), rope_theta=500000.0, tie_word_embeddings=False,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout = find_blocks(model)
    selection = BlockSelection.all(layout.num_blocks)
    lora = selection.to_lora_config(layout, target_modules=("q_proj", "v_proj"), r=8, lora_alpha=16,
                                    lora_dropout=0.0, task_type="CAUSAL_LM")
    model = attach_lora(model, selection, lora, layout)
    return model, layout


def make_batch(shape: Shape, device: Any, seed: int = 0):
    """Random token ids; the loss on the last `answer_tokens` tokens of each row (the rest masked)."""
    import torch

    from flexora_tune.objective import Batch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch_size, shape.seq_len), generator=generator)
    targets = torch.full_like(ids, -100)
    targets[:, -shape.answer_tokens:] = ids[:, -shape.answer_tokens:]
    mask = torch.ones_like(ids)
    return Batch(ids, mask, targets).to(torch.device(device))


def count_params(model: Any) -> dict[str, int]:
    """Weights of the blocks' linear layers (N), LoRA weights, and the LM head."""
    from peft.tuners.lora import LoraLayer
    from torch import nn

    frozen = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            frozen += module.get_base_layer().weight.numel()
            lora += sum(p.numel() for p in module.lora_A.parameters()) + sum(
                p.numel() for p in module.lora_B.parameters())
        elif isinstance(module, nn.Linear) and ".layers." in name and "lora_" not in name \
                and "base_layer" not in name:
            frozen += module.weight.numel()
    head = model.get_base_model().get_output_embeddings().weight.numel()
    return {"frozen_block_linear": frozen, "lora": lora, "lm_head": head}


def step_flops(shape: Shape, params: dict[str, int], kind: str) -> float:
    """Matmul FLOPs of one step of `kind` (see the module doc for the formula)."""
    tokens = shape.batch_size * shape.seq_len
    answers = shape.batch_size * shape.answer_tokens
    n, n_lora = params["frozen_block_linear"], params["lora"]
    attention_fwd = 2 * shape.seq_len * shape.hidden * shape.layers  # causal: half of 4 S d L
    head_fwd = 2 * shape.hidden * shape.vocab
    forward = tokens * (2 * n + 2 * n_lora + attention_fwd) + answers * head_fwd
    backward_lora = tokens * (2 * n + 4 * n_lora + 2 * attention_fwd) + answers * head_fwd
    backward_gate = tokens * (2 * n + 2 * n_lora + 2 * attention_fwd) + answers * head_fwd
    if kind == "lora":
        return forward + backward_lora
    if kind == "first_order":
        return (forward + backward_lora) + (forward + backward_gate)
    if kind == "second_order":
        # lora_grad; validation fwd/bwd to alpha and the LoRA weights; two training fwd/bwd to alpha
        return (forward + backward_lora) + (forward + backward_lora) + 2 * (forward + backward_gate)
    raise ValueError(kind)


class Meter:
    """Times a callable and reads its peak memory on CUDA (max_memory_allocated) or CPU (peak RSS)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def measure(self, fn: Callable[[], Any]) -> dict[str, float]:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            before = rss_bytes()
        started = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()
        return {"s": elapsed, "peak_gib": peak / GIB, "over_gib": (peak - before) / GIB, "before_gib": before / GIB}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, interleave the step types, and return the measurements and derived figures."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from flexora_tune.flexora import BilevelLoop, SearchSettings
    from flexora_tune.objective import loss_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU node, or smoke-test with --device cpu --tiny")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shape = tiny_shape() if args.tiny else Shape(args.layers, args.hidden, args.intermediate, args.heads,
                                                 args.kv_heads, args.vocab, args.batch_size, args.seq_len,
                                                 args.answer_tokens)
    model, layout = build_model(shape, args.device, dtype)
    batch = make_batch(shape, args.device)
    params = count_params(model)
    kinds = ["lora", "first_order"] + (["second_order"] if args.second_order else [])
    total_steps = (args.warmup + args.steps) * len(kinds) + 10
    loss = lambda m, b: loss_fn(m, b, "causal_lm")  # noqa: E731

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, total_steps)
    searches = {
        kind: BilevelLoop(model, layout, loss, lambda i: batch, lambda i: batch,
                            SearchSettings(hypergradient=kind, batch_size=shape.batch_size), total_steps)
        for kind in kinds if kind != "lora"
    }
    for search in searches.values():
        search.gates.remove()

    def plain_step() -> None:
        model.train()
        for p in trainable:  # a search's gate step leaves the LoRA weights frozen
            p.requires_grad_(True)
        value = loss(model, batch)
        value.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value.item()

    def search_step(kind: str, index: int) -> Callable[[], None]:
        def go() -> None:
            searches[kind].step(index)
        return go

    counted: dict[str, float] = {}
    if args.count_flops:  # one extra step of each kind under torch's FLOP counter, to check the formula
        from torch.utils.flop_counter import FlopCounterMode

        for kind in kinds:
            with FlopCounterMode(display=False) as counter:
                if kind == "lora":
                    plain_step()
                else:
                    searches[kind].gates.attach(model, layout)
                    try:
                        searches[kind].step(0)
                    finally:
                        searches[kind].gates.remove()
            counted[kind] = float(counter.get_total_flops())
    meter = Meter(args.device)
    records: list[dict[str, Any]] = []
    for i in range(args.warmup + args.steps):
        for kind in kinds:
            if kind == "lora":
                result = meter.measure(plain_step)
            else:
                search = searches[kind]
                search.gates.attach(model, layout)  # gates only while this search steps
                try:
                    result = meter.measure(search_step(kind, i))
                finally:
                    search.gates.remove()
            if i >= args.warmup:
                records.append({"kind": kind, "round": i - args.warmup, **result})
    tokens = shape.batch_size * shape.seq_len
    summary = []
    for kind in kinds:
        mine = [r for r in records if r["kind"] == kind]
        seconds = median(r["s"] for r in mine)
        flops = step_flops(shape, params, kind)
        summary.append({
            "kind": kind, "step_s": seconds, "train_tokens_per_s": tokens / seconds,
            "peak_gib": max(r["peak_gib"] for r in mine), "over_gib": max(r["over_gib"] for r in mine),
            "before_gib": median(r["before_gib"] for r in mine), "flops": flops,
            "achieved_tflops": flops / seconds / 1e12, "counted_flops": counted.get(kind, math.nan),
            "utilisation": flops / seconds / (args.peak_tflops * 1e12),
        })
    ref = summary[0]
    for row in summary:
        row["time_ratio"] = row["step_s"] / ref["step_s"]
        row["peak_ratio"] = row["peak_gib"] / ref["peak_gib"]
        row["over_ratio"] = row["over_gib"] / ref["over_gib"] if ref["over_gib"] > 0 else math.nan
    device_name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    return {"shape": asdict(shape), "dtype": args.dtype, "device": args.device, "device_name": device_name,
            "params": params, "peak_tflops": args.peak_tflops, "summary": summary, "records": records,
            "ray_imported": "ray" in sys.modules}


def save_reuse_model(shape: Shape, directory: Path, device: Any, dtype: Any) -> Path:
    """A Llama of `shape`'s width and depth with random weights and the tests' word-level tokenizer (its
    vocabulary instead of `shape.vocab`), saved with save_pretrained: a local model for `load_model`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    tokenizer = tiny.tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


def reuse_check(args: argparse.Namespace, shape: Shape) -> dict[str, Any]:
    """Fine-tunes in one process with the model cache, as a reused Ray worker runs them; after each,
    `release_trial_memory()` and the memory left allocated (see the module doc)."""
    import torch

    from flexora_tune import models
    from flexora_tune.finetune import finetune

    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    scratch = Path(tempfile.mkdtemp(prefix="gpu_reuse_"))
    path = str(save_reuse_model(shape, scratch / "model", device, dtype))
    rows = tiny.classification_rows(200)
    three = [{**r, "label": r["label"] + str(i // 2 % 2) if r["label"] == "sport" else r["label"]}
             for i, r in enumerate(rows)]
    sources = {2: tiny.write_csv(scratch / "task2.csv", rows), 3: tiny.write_csv(scratch / "task3.csv", three)}
    settings = {"max_steps": args.reuse_steps, "eval_every": args.reuse_steps, "batch_size": 4,
                "eval_batch_size": 16, "lr": 1e-3, "device": str(device), "dtype": args.dtype}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        sync()
        return torch.cuda.memory_allocated() if cuda else 0

    def trial(label: str, num_labels: int, blocks: list[int], seed: int) -> dict[str, Any]:
        task = {"source": str(sources[num_labels]), "max_length": 32, "val_size": 16, "test_size": 16}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = finetune(path, task, blocks, seed=seed, **settings)
        seconds = time.perf_counter() - started
        live = models.release_trial_memory()
        return {"trial": label, "num_labels": num_labels, "blocks": blocks, "seed": seed, "s": seconds,
                "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                "val_loss": result.val_loss, "allocated": allocated(), "cached": models.cached_model_bytes(device),
                "peak": torch.cuda.max_memory_allocated() if cuda else 0, "live_copies": live}

    previous = os.environ.get(models.CACHE_ENV)
    try:
        models.release_cached_models()
        empty = allocated()
        os.environ[models.CACHE_ENV] = "0"
        reference = trial("A, no cache", 2, [0], 0)
        os.environ[models.CACHE_ENV] = "1"
        loads = {}
        for kind in ("load from disk", "copy of the cached model"):
            started = time.perf_counter()
            model, _ = models.load_model(path, "classification", num_labels=2, device=device, dtype=dtype)
            sync()
            loads[kind] = time.perf_counter() - started
            del model
            models.release_trial_memory()
        plan = [("A", 2, [0], 0), ("A", 2, [shape.layers - 1], 1), ("A", 2, [0], 0),
                ("B (3 labels: another cache key)", 3, [0], 0), ("A again (reloaded)", 2, [0], 0)]
        trials = [trial(*step) for step in plan]
    finally:
        if previous is None:
            os.environ.pop(models.CACHE_ENV, None)
        else:
            os.environ[models.CACHE_ENV] = previous
        models.release_cached_models()
    constant = reference["allocated"] - empty  # what a trial leaves allocated without any cache
    for row in trials:
        row["leftover"] = row["allocated"] - empty - row["cached"] if cuda else math.nan
        row["ok"] = row["live_copies"] == 0 and (not cuda or row["leftover"] == constant)
    same = [(r["val_accuracy"], r["test_accuracy"], r["val_loss"]) for r in [reference, *trials]
            if r["num_labels"] == 2 and r["blocks"] == [0]]
    return {"device": str(device), "dtype": args.dtype, "empty": empty, "constant": constant, "loads_s": loads,
            "reference": reference, "trials": trials, "same_numbers": len(set(same)) == 1,
            "ok": all(r["ok"] for r in trials) and reference["live_copies"] == 0}


def reuse_markdown(reuse: dict[str, Any]) -> str:
    """The reused-worker section of gpu.md."""
    mib = 2**20
    lines = [
        "## Reused trial workers: memory between trials", "",
        f"Device {reuse['device']}, {reuse['dtype']}. Allocated before any trial: {reuse['empty'] / mib:.1f} MiB; "
        f"a trial without the cache leaves {reuse['constant'] / mib:.1f} MiB allocated (workspaces), the *constant*. "
        "*leftover*: allocated after the trial and `release_trial_memory()`, minus the empty device, minus the "
        "cached models (`cached_model_bytes`); it must equal the constant. *live copies*: trial models still "
        "referenced (must be 0). On a CPU only the live copies are checked.", "",
        f"Load of the model: {reuse['loads_s']['load from disk']:.2f} s from disk, "
        f"{reuse['loads_s']['copy of the cached model']:.3f} s as a copy of the cached model.", "",
    ]
    rows = [[r["trial"], r["seed"], ",".join(map(str, r["blocks"])), fmt(r["s"], 2), fmt(r["val_accuracy"], 4),
             fmt(r["val_loss"], 4), f"{r['cached'] / mib:.1f}", f"{r['allocated'] / mib:.1f}",
             f"{r['peak'] / mib:.1f}", fmt(r["leftover"] / mib, 3), r["live_copies"], "yes" if r["ok"] else "NO"]
            for r in reuse["trials"]]
    lines.append(markdown_table(["trial", "seed", "blocks", "s", "val acc", "val loss", "cached MiB",
                                 "allocated after MiB", "peak MiB", "leftover MiB", "live copies", "ok"], rows))
    lines += ["", f"Same seed and subset with and without the cache: "
              f"{'the same' if reuse['same_numbers'] else 'DIFFERENT'} val/test accuracy and val loss. "
              f"Check: {'passed' if reuse['ok'] else 'FAILED'}.", ""]
    return "\n".join(lines)


def tiny_shape() -> Shape:
    """A few-MB Llama for a CPU smoke test."""
    return Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, batch_size=2, seq_len=32,
                 answer_tokens=4)


def write_markdown(result: dict[str, Any], info: dict[str, Any], command: str) -> str:
    """The step benchmark's part of gpu.md."""
    s, p = result["shape"], result["params"]
    memory = "torch.cuda.max_memory_allocated" if result["device"].startswith("cuda") else "peak RSS (CPU)"
    rows = [[r["kind"], fmt(r["step_s"], 4), fmt(r["time_ratio"], 2), fmt(r["train_tokens_per_s"], 0),
             fmt(r["peak_gib"], 3), fmt(r["peak_ratio"], 2), fmt(r["over_gib"], 3), fmt(r["over_ratio"], 2),
             f"{r['flops'] / 1e9:.4g}", f"{r['counted_flops'] / 1e9:.4g}" if math.isfinite(r["counted_flops"]) else "-",
             fmt(r["achieved_tflops"], 1), fmt(100 * r["utilisation"], 1)] for r in result["summary"]]
    text = header_markdown("GPU: a Flexora search step vs a plain LoRA step", info, command, None)
    text += (
        f"- Device: {result['device_name']} ({result['device']}), {result['dtype']}; peak assumed "
        f"{result['peak_tflops']} TFLOP/s; Ray imported: {result['ray_imported']}\n"
        f"- Model: Llama, {s['layers']} blocks, hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['heads']} heads / {s['kv_heads']} KV heads, vocabulary {s['vocab']}, random weights; LoRA r 8 on "
        f"q_proj/v_proj of every block. N (block linear weights) = {p['frozen_block_linear']:,}, "
        f"LoRA = {p['lora']:,}, LM head = {p['lm_head']:,}\n"
        f"- Batch: {s['batch_size']} x {s['seq_len']} tokens, loss on the last {s['answer_tokens']} tokens per "
        "row; the same batch is the search's validation batch\n\n"
        f"Memory: {memory}; *over*: the step's peak minus what was allocated before it. Tokens/s counts the "
        "training batch only. FLOPs and utilisation: the formula in the script's docstring.\n\n"
    )
    text += markdown_table(["step", "s", "time ratio", "train tokens/s", "peak GiB", "peak ratio", "over GiB",
                            "over ratio", "GFLOP/step (formula)", "GFLOP/step (torch counter)", "TFLOP/s",
                            "utilisation %"], rows)
    return text + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="weights and activations")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch (CPU smoke test)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (default 4096, Llama-3-8B)")
    parser.add_argument("--intermediate", type=int, default=14336, help="MLP size (default 14336)")
    parser.add_argument("--heads", type=int, default=32, help="attention heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (default 128256)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8, the reference)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default 1024, the reference)")
    parser.add_argument("--answer-tokens", type=int, default=8, help="loss tokens per row (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds, each one step of every kind (10)")
    parser.add_argument("--second-order", action="store_true", help="also time the second-order search step")
    parser.add_argument("--count-flops", action="store_true",
                        help="also count each step's FLOPs with torch.utils.flop_counter (one extra step each), to "
                             "check the formula (on by default with --tiny)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak in TFLOP/s (default 989: H100/H200 SXM)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS,
                        help="results directory (default: $OUT if set, else benchmarks/results)")
    parser.add_argument("--reuse-check", default="on", choices=("on", "off", "only"),
                        help="the reused-worker memory check: after the step benchmark (on), not (off), or alone")
    parser.add_argument("--reuse-steps", type=int, default=4, help="training steps per reuse-check trial (4)")
    parser.add_argument("--name", default=None, help="result file stem (default gpu, or gpu_smoke_cpu with --tiny)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.count_flops = args.count_flops or args.tiny
    command = command_line()
    result = run(args) if args.reuse_check != "only" else None
    shape = tiny_shape() if args.tiny else Shape(args.layers, args.hidden, args.intermediate, args.heads,
                                                 args.kv_heads, args.vocab, args.batch_size, args.seq_len,
                                                 args.answer_tokens)
    reuse = reuse_check(args, shape) if args.reuse_check != "off" else None
    ray_imported = "ray" in sys.modules
    info = machine_info()
    stem = "gpu_reuse" if result is None else "gpu"
    name = args.name or (f"{stem}_smoke_cpu" if args.tiny and args.device == "cpu" else stem)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{name}.json", {"command": command, "machine": info, **(result or {}), "reuse": reuse,
                                           "ray_imported": ray_imported})
    text = write_markdown(result, info, command) if result else header_markdown(
        "GPU: reused trial workers", info, command, None) + f"- Ray imported: {ray_imported}\n"
    (args.out / f"{name}.md").write_text(text + ("\n" + reuse_markdown(reuse) if reuse else ""))
    for r in (result or {}).get("summary", []):
        print(f"{r['kind']:>13}: {r['step_s']:.4f}s x{r['time_ratio']:.2f}, {r['train_tokens_per_s']:.0f} tok/s, "
              f"peak {r['peak_gib']:.2f} GiB x{r['peak_ratio']:.2f} (over {r['over_gib']:.2f} GiB), "
              f"{r['achieved_tflops']:.1f} TFLOP/s = {100 * r['utilisation']:.1f}% of peak")
    if reuse:
        for r in reuse["trials"]:
            print(f"[reuse] {r['trial']:>32}: {r['s']:.2f}s, allocated after {r['allocated'] / GIB:.3f} GiB, cached "
                  f"{r['cached'] / GIB:.3f} GiB, leftover {fmt(r['leftover'] / 2**20, 3)} MiB, live copies "
                  f"{r['live_copies']}, ok {r['ok']}")
        print(f"[reuse] loads {reuse['loads_s']}; constant {reuse['constant'] / 2**20:.3f} MiB; same numbers "
              f"{reuse['same_numbers']}; check {'passed' if reuse['ok'] else 'FAILED'}")
    print(f"[gpu] Ray imported: {ray_imported}; wrote {args.out / name}.md/.json")
    return 1 if ray_imported or (reuse is not None and not reuse["ok"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
