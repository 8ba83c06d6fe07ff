"""What the Flexora search costs against one all-blocks fine-tune, what stopping it early changes, and how the
selection generalises where all-blocks LoRA overfits. No Ray: the core's `search_layers` and `finetune`.

Per seed, on one model and task (default: the embedded default in the small-data regime below):
  1. an all-blocks LoRA fine-tune (the cost and quality reference);
  2. the full-length search, sized by the default rule (`default_search_steps`: the reference's share of the
     fine-tune), alpha recorded every step;
  3. the same search with stop-when-stable, run for real; from the full search's trajectory, also where each
     window in `--windows` would have stopped and what it would have selected;
  4. fine-tunes on the full search's selection, the stopped search's (when it differs), the last k blocks and
     a seeded random k blocks, k = the stopped search's size.
It writes `<name>.json` (everything), `<name>.csv` (one row per fine-tune), `<name>.md` and
`<name>_trajectory.png` to benchmarks/results/.

Small-data regime (the default): the first 96 training articles, 5 epochs (60 steps of 8), lr 5e-3, 48 tokens;
the search then makes one pass over those 96 articles (12 steps).

    .venv/bin/python benchmarks/search_budget.py                          # ~30 min on 2 CPU cores
    .venv/bin/python benchmarks/search_budget.py --model tiny --seeds 2   # smoke test, a minute
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    LoadSampler,
    command_line,
    fmt,
    header_markdown,
    machine_info,
    markdown_table,
    write_csv,
    write_json,
)

ARMS = ("all", "flexora (full search)", "flexora (stopped search)", "last-k", "random-k")


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def where_it_stops(full: Any, window: int, rank_corr: float) -> tuple[int, tuple[int, ...]]:
    """The step at which a search with stop-when-stable `window` would stop, replayed on the full search's
    per-step alpha trajectory (a stopped search is exactly the start of the full one), and its selection."""
    from flexora_tune.flexora import rank_correlation, select_blocks

    s = full.settings
    chosen = [select_blocks(a, s["rule"], s["top_k"], s["min_blocks"], s["max_blocks"])[0]
              for a in full.alpha_trajectory]
    unchanged = 0
    for i in range(1, len(chosen) + 1):
        unchanged = unchanged + 1 if i > 1 and chosen[i - 1] == chosen[i - 2] else 0
        if unchanged >= window and i > window:
            if rank_correlation(full.alpha_trajectory[i - 1 - window], full.alpha_trajectory[i - 1]) >= rank_corr:
                return i, chosen[i - 1]
    return len(chosen), chosen[-1]


def run_seed(model: str, data: Any, seed: int, tune: dict[str, Any], search: dict[str, Any],
             window: int, windows: list[int]) -> dict[str, Any]:
    from flexora_tune.finetune import finetune
    from flexora_tune.flexora import search_layers

    def fine_tune(blocks: Any, arm: str) -> dict[str, Any]:
        result = finetune(model, data, blocks=blocks, seed=seed, verbose=False, **tune)
        row = {"seed": seed, "arm": arm, "blocks": result.blocks, "num_blocks": result.num_blocks,
               "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
               "train_loss": result.train_loss, "compute_s": result.compute_s, "steps": result.steps,
               "history": result.history}
        print(f"[search_budget] seed {seed} {arm}: {result.num_blocks} blocks val {result.val_accuracy:.3f} "
              f"test {result.test_accuracy:.3f} ({result.compute_s:.0f}s)", flush=True)
        return row

    runs = [fine_tune(None, "all")]
    full = search_layers(model, data, seed, finetune=tune, record_every=1, stop_when_stable=None, **search)
    stopped = search_layers(model, data, seed, finetune=tune, record_every=1, stop_when_stable=window, **search)
    print(f"[search_budget] seed {seed} searches: full {full.steps} steps {list(full.blocks)} "
          f"({full.compute_s:.0f}s); stopped {stopped.steps} steps {list(stopped.blocks)} "
          f"({stopped.compute_s:.0f}s): {stopped.stop_reason}", flush=True)
    runs.append(fine_tune(full.blocks, "flexora (full search)"))
    if stopped.blocks == full.blocks:
        runs.append({**runs[-1], "arm": "flexora (stopped search)"})
    else:
        runs.append(fine_tune(stopped.blocks, "flexora (stopped search)"))
    k, total = stopped.num_blocks, stopped.num_blocks_total
    runs.append(fine_tune(list(range(total - k, total)), "last-k"))
    runs.append(fine_tune(sorted(random.Random(f"random-k:{seed}").sample(range(total), k)), "random-k"))
    replay = []
    for w in windows:
        step, blocks = where_it_stops(full, w, stopped.settings["stable_rank_corr"])
        replay.append({"seed": seed, "window": w, "stop_step": step, "full_steps": full.steps,
                       "num_blocks": len(blocks), "jaccard_with_full": jaccard(set(blocks), set(full.blocks))})
    return {"seed": seed, "full": full.to_dict(), "stopped": stopped.to_dict(), "finetunes": runs, "replay": replay}


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    by_arm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for record in seeds:
        for row in record["finetunes"]:
            by_arm[row["arm"]].append(row)
    arms = []
    for arm in ARMS:
        rows = by_arm[arm]
        test, val = mean_se([r["test_accuracy"] for r in rows]), mean_se([r["val_accuracy"] for r in rows])
        arms.append({"arm": arm, "test_mean": test[0], "test_se": test[1], "val_mean": val[0], "val_se": val[1],
                     "test_min": min(r["test_accuracy"] for r in rows),
                     "test_max": max(r["test_accuracy"] for r in rows),
                     "num_blocks_mean": math.fsum(r["num_blocks"] for r in rows) / len(rows)})
    per_seed = []
    for record in seeds:
        runs = {r["arm"]: r for r in record["finetunes"]}
        full, stopped, base = record["full"], record["stopped"], runs["all"]["compute_s"]
        per_seed.append({
            "seed": record["seed"], "all_blocks_finetune_s": base,
            "full_search_steps": full["steps"], "full_search_s": full["compute_s"],
            "stopped_search_steps": stopped["steps"], "stopped_search_s": stopped["compute_s"],
            "steps_saved": full["steps"] - stopped["steps"],
            "jaccard_stopped_vs_full": jaccard(set(stopped["blocks"]), set(full["blocks"])),
            "full_blocks": stopped_text(full["blocks"]), "stopped_blocks": stopped_text(stopped["blocks"]),
            "pipeline_ratio_full": (full["compute_s"] + runs["flexora (full search)"]["compute_s"]) / base,
            "pipeline_ratio_stopped": (stopped["compute_s"] + runs["flexora (stopped search)"]["compute_s"]) / base,
            "search_share_stopped": stopped["compute_s"] / base, "stop_reason": stopped["stop_reason"],
        })
    return {"arms": arms, "per_seed": per_seed}


def stopped_text(blocks: list[int]) -> str:
    from flexora_tune.blocks import format_blocks

    return format_blocks(blocks)


def plot_trajectories(seeds: list[dict[str, Any]], path: Path) -> Path | None:
    """Per seed: the full search's selection overlap with its own final selection, step by step, and where
    the stopped search ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexora_tune.flexora import select_blocks

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for record in seeds:
        full, stopped = record["full"], record["stopped"]
        s = full["settings"]
        final = set(full["blocks"])
        overlap = [jaccard(set(select_blocks(a, s["rule"], s["top_k"], s["min_blocks"], s["max_blocks"])[0]), final)
                   for a in full["alpha_trajectory"]]
        line, = ax.plot(full["trajectory_steps"], overlap, marker=".", label=f"seed {record['seed']}")
        ax.axvline(stopped["steps"], color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("search step")
    ax.set_ylabel("Jaccard overlap with the final selection")
    ax.set_ylim(0, 1.05)
    ax.set_title("Selection during the full search (dashed: where stop-when-stable ended)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_markdown(path: Path, result: dict[str, Any], info: dict[str, Any], command: str,
                   load: dict[str, float], settings: dict[str, Any]) -> None:
    summary = result["summary"]
    text = header_markdown("Flexora search budget, stop-when-stable and the small-data regime", info, command, load)
    text += (f"\n- Model `{settings['model']}`, task `{settings['task']}`; fine-tune settings "
             f"`{json.dumps(settings['finetune'])}`; search settings `{json.dumps(settings['search'])}` "
             f"(length from `default_search_steps`), stop-when-stable window {settings['window']}; seeds "
             f"{settings['seeds']}.\n- `compute_s` counts training and validation evaluation; the test set is "
             "evaluated apart and never chooses anything.\n\n")
    text += "## Per seed: search cost and stop-when-stable\n\n"
    text += markdown_table(
        ["seed", "all-blocks fine-tune (s)", "full search steps (s)", "stopped search steps (s)", "steps saved",
         "Jaccard stopped vs full", "full selection", "stopped selection", "pipeline / all-blocks (full)",
         "pipeline / all-blocks (stopped)"],
        [[r["seed"], fmt(r["all_blocks_finetune_s"], 0), f"{r['full_search_steps']} ({fmt(r['full_search_s'], 0)})",
          f"{r['stopped_search_steps']} ({fmt(r['stopped_search_s'], 0)})", r["steps_saved"],
          fmt(r["jaccard_stopped_vs_full"]), r["full_blocks"], r["stopped_blocks"],
          fmt(r["pipeline_ratio_full"]), fmt(r["pipeline_ratio_stopped"])] for r in summary["per_seed"]])
    text += "\n\n## Test accuracy per arm (mean ± standard error over seeds, [min, max])\n\n"
    text += markdown_table(
        ["arm", "test accuracy", "[min, max]", "val accuracy", "blocks (mean)"],
        [[a["arm"], f"{fmt(a['test_mean'], 3)} ± {fmt(a['test_se'], 3)}",
          f"[{fmt(a['test_min'], 3)}, {fmt(a['test_max'], 3)}]", f"{fmt(a['val_mean'], 3)} ± {fmt(a['val_se'], 3)}",
          fmt(a["num_blocks_mean"], 1)] for a in summary["arms"]])
    text += "\n\n## Other stop-when-stable windows, replayed on the full searches\n\n"
    text += markdown_table(["seed", "window", "would stop at step", "of", "blocks", "Jaccard with full"],
                           [[r["seed"], r["window"], r["stop_step"], r["full_steps"], r["num_blocks"],
                             fmt(r["jaccard_with_full"])] for rec in result["seeds"] for r in rec["replay"]])
    text += f"\n\n![selection during the search]({path.stem}_trajectory.png)\n"
    path.write_text(text)


def _tiny(directory: Path) -> tuple[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import tiny

    model = tiny.save_model_dir(directory / "tiny_llama", "llama")
    return str(model), str(tiny.write_csv(directory / "keywords.csv", tiny.classification_rows(300)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name/path, or 'tiny' for a smoke test")
    parser.add_argument("--task", default="default", help="task name or file (default: BBC News)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=96, help="fine-tune training set (default 96)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--val-size", type=int, default=150)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--window", type=int, default=4, help="stop-when-stable window of the stopped search")
    parser.add_argument("--windows", default="2,3,4,6,8", help="windows replayed on the full search")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None, help="result stem (default search_budget, or *_tiny_smoke)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.name or ("search_budget_tiny_smoke" if args.model == "tiny" else "search_budget")
    command, info, load = command_line(), machine_info(), LoadSampler()
    from flexora_tune.tasks import load_task

    tune = {"max_train_examples": args.train_examples, "epochs": args.epochs, "lr": args.lr,
            "eval_every": 10**9, "threads": args.threads}
    tune = {k: v for k, v in tune.items() if v is not None}
    search = {"lr": args.lr, **({"threads": args.threads} if args.threads else {})}
    with tempfile.TemporaryDirectory(prefix="flexora_budget_") as tmp:
        model, task = _tiny(Path(tmp)) if args.model == "tiny" else (args.model, args.task)
        data = load_task({"source": task, "max_length": args.max_length, "val_size": args.val_size,
                          "test_size": args.test_size})
        windows = [int(w) for w in args.windows.split(",") if w]
        seeds = []
        for seed in range(args.seeds):
            load.sample()
            seeds.append(run_seed(model, data, seed, tune, search, args.window, windows))
    load.sample()
    shown_task = "tiny keyword CSV" if args.model == "tiny" else args.task
    result = {"settings": {"model": args.model, "task": shown_task, "finetune": tune, "search": search,
                           "window": args.window, "seeds": args.seeds, "sizes": data.sizes()},
              "seeds": seeds, "summary": summarise(seeds), "machine": info, "command": command}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", result)
    write_csv(RESULTS / f"{name}.csv", [{k: v for k, v in r.items() if k != "history"}
                                        for rec in seeds for r in rec["finetunes"]])
    plot_trajectories(seeds, RESULTS / f"{name}_trajectory.png")
    write_markdown(RESULTS / f"{name}.md", result, info, command, load.summary(), result["settings"])
    for a in result["summary"]["arms"]:
        print(f"{a['arm']:>26}: test {a['test_mean']:.3f} ± {a['test_se']:.3f}")
    print(f"[search_budget] wrote {RESULTS / name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
