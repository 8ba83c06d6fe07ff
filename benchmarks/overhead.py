"""Search overhead: time and peak memory of one Flexora search step (first- and second-order) against one
plain LoRA training step, on the same model and the same batch, as ratios.

Every (model, variant, repeat) runs in its own subprocess with one torch thread, so peak memory is that
variant's alone; repeats are interleaved (variant order rotated each repeat) so a change in the machine's
load hits every variant alike. In each subprocess: load the model and attach LoRA (all blocks, q_proj/v_proj,
r 8), encode one fixed batch, run `--warmup` steps, note the resident memory (the baseline: it must come
after a step, because the weights are memory-mapped from the safetensors file and only become resident when
the first forward touches them), then run `--steps` timed steps; before each timed step the kernel's RSS
high-water mark is reset, so the step's peak is read exactly (VmHWM). Reported per step: wall time, CPU time,
peak RSS above the baseline (the step's working memory: activations and gradients) and the total peak RSS.

Variants:
  lora          the plain LoRA step as `finetune` does it (forward, backward, AdamW, cosine schedule)
  first_order   `BilevelLoop.step` with hypergradient first_order: the LoRA step with gated blocks, then
                the gate step (forward/backward of a validation batch to alpha, Adam on alpha)
  second_order  `BilevelLoop.step` with hypergradient second_order (DARTS one-step unrolled)
Inside the search variants, the parts of a step (the LoRA half, the gate half) are timed and their peaks read
too. The validation batch is the same batch as the training batch, so the only difference is the work done.

Expectation: first_order ~ 2x the time of a LoRA step (a training step plus a validation forward/backward)
and < 1.3x its memory.

    .venv/bin/python benchmarks/overhead.py                       # tiny model and the embedded default
    .venv/bin/python benchmarks/overhead.py --models tiny --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    RESULTS,
    LoadSampler,
    command_line,
    fmt,
    header_markdown,
    machine_info,
    markdown_table,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    spread,
    write_csv,
    write_json,
)

VARIANTS = ("lora", "first_order", "second_order")
MIB = 2**20
RESULT_PREFIX = "RESULT "


# --- the measured process -------------------------------------------------------------------------------------

class PartTimer:
    """Wraps methods of one object so each call's wall time, CPU time and RSS peak are recorded by name.

    The RSS high-water mark is reset at the start of every wrapped call, so a part's peak is its own; the
    enclosing step's peak is the max over its parts and the remainder after the last part.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float, int]]] = {}

    def wrap(self, owner: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            reset_peak_rss()
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                entry = (time.perf_counter() - wall, time.process_time() - cpu, peak_rss_bytes())
                self.calls.setdefault(name, []).append(entry)

        setattr(owner, name, timed)

    def clear(self) -> None:
        self.calls = {}


def _status_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _task_arg(task: str, seq_len: int | None) -> str | dict[str, Any]:
    if seq_len is None:
        return task
    return {"source": task, "max_length": seq_len}


def measure(model: str, task: str, variant: str, steps: int, warmup: int, batch_size: int, threads: int,
            seq_len: int | None, seed: int = 0) -> dict[str, Any]:
    """Run one variant in this process and return its per-step timings and peaks (see the module doc)."""
    import torch

    torch.set_num_threads(threads)
    from transformers import get_cosine_schedule_with_warmup

    from flexora_tune.finetune import FinetuneSettings, open_lora_session
    from flexora_tune.flexora import prepare_search
    from flexora_tune.models import load_tokenizer
    from flexora_tune.objective import encode, loss_fn
    from flexora_tune.tasks import load_task

    data = load_task(_task_arg(task, seq_len))
    tokenizer = load_tokenizer(model)
    batch = encode(data.train[:batch_size], tokenizer, data.kind, data.spec.max_length)
    runtime = {"batch_size": batch_size, "threads": threads, "device": "cpu", "dtype": "float32"}
    parts = PartTimer()
    total = warmup + steps + 10
    if variant == "lora":
        session = open_lora_session(model, data, None, FinetuneSettings(**runtime), seed)
        net = session.model
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        scheduler = get_cosine_schedule_with_warmup(optimizer, 0, total)
        net.train()

        def step(i: int) -> None:
            loss = loss_fn(net, batch, data.kind)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
    elif variant in ("first_order", "second_order"):
        search = prepare_search(model, data, seed, steps=total, hypergradient=variant, **runtime)
        search.train_batch = lambda i: batch
        search.val_batch = lambda i: batch
        net = search.model
        names = ["lora_step", "gate_grad_first_order"] if variant == "first_order" else [
            "lora_grad", "gate_grad_second_order", "_lora_update"]
        for name in names:
            parts.wrap(search, name)
        step = search.step
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in net.parameters())
    loaded = rss_bytes()
    for i in range(warmup):
        step(i)
    baseline = rss_bytes()  # after warm-up: the weights' mmapped pages are in, optimizer state exists
    parts.clear()
    rows = []
    for i in range(warmup, warmup + steps):
        reset_peak_rss()
        wall, cpu = time.perf_counter(), time.process_time()
        step(i)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = max([peak_rss_bytes(), *(c[2] for calls in parts.calls.values() for c in calls[-1:])])
        rows.append({"wall_s": wall, "cpu_s": cpu, "peak_rss": peak})
    part_summary = {
        name: {"wall_s": median(c[0] for c in calls), "cpu_s": median(c[1] for c in calls),
               "peak_over_baseline_mib": (max(c[2] for c in calls) - baseline) / MIB}
        for name, calls in parts.calls.items()
    }
    return {
        "variant": variant, "batch_shape": list(batch.input_ids.shape), "trainable_params": trainable,
        "total_params": total_params, "baseline_rss_mib": baseline / MIB,
        "loaded_rss_mib": loaded / MIB, "file_backed_rss_mib": _status_mib("RssFile"), "steps": rows,
        "parts": part_summary,
    }


# --- the driver -----------------------------------------------------------------------------------------------

def _tiny_model(directory: Path) -> tuple[str, str]:
    """The 4-block tiny Llama of the tests (hidden 32) and its keyword-classification CSV, saved in `directory`."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    model = tiny.save_model_dir(directory / "tiny_llama", "llama")
    task = tiny.write_csv(directory / "keywords.csv", tiny.classification_rows(200))
    return str(model), str(task)


def run_worker(args: argparse.Namespace, model: str, task: str, variant: str, steps: int,
               seq_len: int | None) -> dict[str, Any]:
    """Measure one variant in a fresh subprocess and return its result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-model", model,
               "--worker-task", task, "--worker-variant", variant, "--steps", str(steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if seq_len is not None:
        command += ["--seq-len", str(seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           # freed tensors go straight back to the OS, so RSS follows live memory (no glibc heap retention)
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, variant): medians over every timed step of every repeat, and ratios to `lora`."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        stats: dict[str, dict[str, Any]] = {}
        for variant in dict.fromkeys(r["variant"] for r in mine):
            these = [r for r in mine if r["variant"] == variant]
            steps = [s for r in these for s in r["steps"]]
            base = median(r["baseline_rss_mib"] for r in these)
            peaks = [s["peak_rss"] / MIB for s in steps]
            over = [s["peak_rss"] / MIB - r["baseline_rss_mib"] for r in these for s in r["steps"]]
            stats[variant] = {
                "model": model, "variant": variant, "repeats": len(these), "timed_steps": len(steps),
                "batch_shape": "x".join(map(str, these[0]["batch_shape"])),
                "trainable_params": these[0]["trainable_params"], "total_params": these[0]["total_params"],
                "wall_s": median(s["wall_s"] for s in steps), "wall_s_range": spread(s["wall_s"] for s in steps),
                "cpu_s": median(s["cpu_s"] for s in steps), "baseline_rss_mib": base,
                "peak_rss_mib": median(peaks), "peak_over_baseline_mib": median(over),
                "parts": {name: median_parts(these, name) for name in these[0]["parts"]},
            }
        ref = stats.get("lora")
        for variant, row in stats.items():
            if ref is not None:
                row["time_ratio"] = row["wall_s"] / ref["wall_s"]
                row["cpu_ratio"] = row["cpu_s"] / ref["cpu_s"]
                row["peak_rss_ratio"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
                row["working_memory_ratio"] = (row["peak_over_baseline_mib"] / ref["peak_over_baseline_mib"]
                                               if ref["peak_over_baseline_mib"] > 0 else float("nan"))
                row["paired_time_ratios"] = paired_ratios(mine, variant)
            rows.append(row)
    return rows


def median_parts(runs: list[dict[str, Any]], name: str) -> dict[str, float]:
    values = [r["parts"][name] for r in runs if name in r["parts"]]
    return {k: median(v[k] for v in values) for k in ("wall_s", "cpu_s", "peak_over_baseline_mib")}


def paired_ratios(runs: list[dict[str, Any]], variant: str) -> list[float]:
    """Per repeat: this variant's median step time over the same repeat's LoRA median (adjacent in time)."""
    out = []
    for rep in sorted({r["repeat"] for r in runs}):
        mine = [r for r in runs if r["repeat"] == rep and r["variant"] == variant]
        ref = [r for r in runs if r["repeat"] == rep and r["variant"] == "lora"]
        if mine and ref:
            out.append(round(median(s["wall_s"] for s in mine[0]["steps"])
                             / median(s["wall_s"] for s in ref[0]["steps"]), 3))
    return out


def write_markdown(path: Path, rows: list[dict[str, Any]], info: dict[str, Any], command: str,
                   load: dict[str, float], args: argparse.Namespace) -> None:
    table = []
    for r in rows:
        lo, hi = r["wall_s_range"]
        table.append([
            r["model"], r["variant"], r["batch_shape"], f"{fmt(r['wall_s'], 3)} ({fmt(lo, 3)}-{fmt(hi, 3)})",
            fmt(r.get("time_ratio"), 2), ", ".join(f"{x:.2f}" for x in r.get("paired_time_ratios", [])),
            fmt(r.get("cpu_ratio"), 2), fmt(r["baseline_rss_mib"], 0), fmt(r["peak_rss_mib"], 0),
            fmt(r["peak_over_baseline_mib"], 1), fmt(r.get("peak_rss_ratio"), 2), fmt(r.get("working_memory_ratio"), 2),
        ])
    parts = []
    for r in rows:
        for name, p in r["parts"].items():
            parts.append([r["model"], r["variant"], name, fmt(p["wall_s"], 3), fmt(p["cpu_s"], 3),
                          fmt(p["peak_over_baseline_mib"], 1)])
    text = header_markdown("Search overhead: a Flexora search step vs a plain LoRA step", info, command, load)
    text += (
        f"\nOne torch thread, batch {args.batch_size}; {args.repeats} interleaved repeats per variant, each in its "
        f"own subprocess ({args.warmup} warm-up step(s), then the timed steps); medians over all timed steps. "
        "Ratios are against `lora` on the same model. *Peak RSS*: the process's peak resident memory during a "
        "step (the model included); *working*: that peak minus the RSS after the warm-up step "
        "(activations and gradients; the weights are memory-mapped and only resident after a first forward, so "
        "the baseline is taken after the warm-up).\n\n"
    )
    text += markdown_table(
        ["model", "variant", "batch", "step s (min-max)", "time ratio", "per-repeat ratios", "CPU ratio",
         "baseline MiB", "peak RSS MiB", "working MiB", "peak RSS ratio", "working ratio"], table)
    text += "\n\nParts of a search step (median wall and CPU seconds, peak above the baseline):\n\n"
    text += markdown_table(["model", "variant", "part", "wall s", "CPU s", "peak over baseline MiB"], parts)
    text += "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,default",
                        help="comma-separated: 'tiny' (the tests' 4-block Llama), 'default' (SmolLM2-135M) or any "
                             "model name/path flexora_tune loads (default: tiny,default)")
    parser.add_argument("--task", default="default", help="task for non-tiny models (default: the BBC News task)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per variant and model (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per subprocess (default 2)")
    parser.add_argument("--tiny-steps", type=int, default=20, help="timed steps per subprocess, tiny model (20)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="max tokens per example (default: the task's, 64 for the default task)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    parser.add_argument("--name", default="overhead", help="result file stem (default overhead)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-task", help=argparse.SUPPRESS)
    parser.add_argument("--worker-variant", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = measure(args.worker_model, args.worker_task, args.worker_variant, args.steps, args.warmup,
                         args.batch_size, args.threads, args.seq_len)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    command, info, load = command_line(), machine_info(), LoadSampler()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flexora_bench_") as tmp:
        for model in [m for m in args.models.split(",") if m]:
            if model == "tiny":
                path, task, steps, seq_len = *_tiny_model(Path(tmp)), args.tiny_steps, None
            else:
                path, task, steps, seq_len = model, args.task, args.steps, args.seq_len
            for rep in range(args.repeats):
                order = variants[rep % len(variants):] + variants[: rep % len(variants)]
                for variant in order:
                    load.sample()
                    started = time.perf_counter()
                    result = run_worker(args, path, task, variant, steps, seq_len)
                    result.update(model=model, repeat=rep)
                    runs.append(result)
                    step_s = median(s["wall_s"] for s in result["steps"])
                    print(f"[overhead] {model} {variant} repeat {rep}: step {step_s:.3f}s"
                          f" peak {median(s['peak_rss'] for s in result['steps']) / MIB:.0f} MiB "
                          f"(baseline {result['baseline_rss_mib']:.0f}) [{time.perf_counter() - started:.0f}s, "
                          f"load {os.getloadavg()[0]:.2f}]", flush=True)
    load.sample()
    rows = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if k != "parts"} | {f"{p}_{k}": v for p, d in r["parts"].items()
                                                            for k, v in d.items()} for r in rows]
    write_csv(args.out / f"{args.name}.csv", flat)
    write_json(args.out / f"{args.name}.json", {"command": command, "machine": info, "load_1min": load.summary(),
                                                 "summary": rows, "runs": runs})
    write_markdown(args.out / f"{args.name}.md", rows, info, command, load.summary(), args)
    for r in rows:
        print(f"{r['model']:>8} {r['variant']:>13}: {r['wall_s']:.3f}s x{r.get('time_ratio', float('nan')):.2f} "
              f"peak {r['peak_rss_mib']:.0f} MiB x{r.get('peak_rss_ratio', float('nan')):.2f} "
              f"working {r['peak_over_baseline_mib']:.1f} MiB x{r.get('working_memory_ratio', float('nan')):.2f}")
    print(f"[overhead] wrote {args.out / args.name}.md/.csv/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
