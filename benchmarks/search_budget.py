"""What the Flexora search costs against one all-blocks fine-tune, what stopping it early changes, what a longer
search would buy, and how the selection generalises where all-blocks LoRA overfits. No Ray: the core's
`search_layers` and `finetune`.

Per seed, on one model and task (default: the embedded default in the small-data regime below), four searches,
each recording alpha at every step:
  - ``sized``: the default length (`default_search_steps`, the reference's share of the fine-tune);
  - ``sized, stopped``: the same with stop-when-stable (`--window` steps);
  - ``long``: `--long-steps` steps (default: as many as the fine-tune has, about twice its compute), the
    full-length search the cheap ones are held against;
  - ``long, stopped``: the long search with stop-when-stable;
then fine-tunes of all blocks, of each distinct selection, of the last k and of a seeded random k blocks
(k = the sized search's count). Every window in `--windows` is also replayed on the full trajectories (a
stopped search is exactly the start of the full one). It writes `<name>.json` (everything), `<name>.csv` (one
row per fine-tune), `<name>.md` and `<name>_trajectory.png` to benchmarks/results/.

Small-data regime (the default): the first 96 training articles, 5 epochs (60 steps of 8), lr 5e-3, 48 tokens,
150 validation and 300 test articles; the sized search makes one pass over those 96 articles (12 steps).

    .venv/bin/python benchmarks/search_budget.py                          # ~50 min on 2 CPU cores
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

SEARCHES = ("sized", "sized, stopped", "long", "long, stopped")
ARMS = ("all", *(f"flexora ({name})" for name in SEARCHES), "last-k", "random-k")


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


def where_it_stops(search: dict[str, Any], window: int, rank_corr: float) -> tuple[int, tuple[int, ...]]:
    """The step at which stop-when-stable with `window` would end `search` (a result dict with alpha at every
    step), replayed on its trajectory, and the selection there."""
    from flexora_tune.flexora import settled_correlation

    chosen = selections(search)
    trajectory = search["alpha_trajectory"]
    unchanged = 0
    for i in range(1, len(chosen) + 1):
        unchanged = unchanged + 1 if i > 1 and chosen[i - 1] == chosen[i - 2] else 0
        if settled_correlation(unchanged, trajectory[:i], window, rank_corr) is not None:
            return i, chosen[i - 1]
    return len(chosen), chosen[-1]


def selections(search: dict[str, Any]) -> list[tuple[int, ...]]:
    """The selection after every recorded step of a search result dict."""
    from flexora_tune.flexora import select_blocks

    s = search["settings"]
    return [select_blocks(a, s["rule"], s["top_k"], s["min_blocks"], s["max_blocks"])[0]
            for a in search["alpha_trajectory"]]


def run_seed(model: str, data: Any, seed: int, tune: dict[str, Any], search: dict[str, Any],
             window: int, windows: list[int], long_steps: int) -> dict[str, Any]:
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
    lengths = {"sized": {}, "long": {"steps": long_steps}}
    searches = {}
    for name in SEARCHES:
        length = lengths[name.split(",")[0]]
        stop = window if name.endswith("stopped") else None
        found = search_layers(model, data, seed, finetune=tune, record_every=1, stop_when_stable=stop,
                              **length, **search)
        searches[name] = found.to_dict()
        print(f"[search_budget] seed {seed} search {name}: {found.steps}/{found.planned_steps} steps "
              f"{list(found.blocks)} ({found.compute_s:.0f}s): {found.stop_reason}", flush=True)
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    for name, found in searches.items():
        blocks = tuple(found["blocks"])
        if blocks not in done:
            done[blocks] = fine_tune(list(blocks), f"flexora ({name})")
        runs.append({**done[blocks], "arm": f"flexora ({name})"})
    k, total = len(searches["sized"]["blocks"]), searches["sized"]["num_blocks_total"]
    runs.append(fine_tune(list(range(total - k, total)), "last-k"))
    runs.append(fine_tune(sorted(random.Random(f"random-k:{seed}").sample(range(total), k)), "random-k"))
    replay = []
    for name in ("sized", "long"):
        full = searches[name]
        for w in windows:
            step, blocks = where_it_stops(full, w, full["settings"]["stable_rank_corr"])
            replay.append({"seed": seed, "search": name, "window": w, "stop_step": step, "full_steps": full["steps"],
                           "num_blocks": len(blocks), "jaccard_with_full": jaccard(set(blocks), set(full["blocks"]))})
    return {"seed": seed, "searches": searches, "finetunes": runs, "replay": replay}


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
    per_search = []
    for record in seeds:
        runs = {r["arm"]: r for r in record["finetunes"]}
        base = runs["all"]["compute_s"]
        for name, found in record["searches"].items():
            reference = record["searches"]["long" if name.startswith("long") else "sized"]
            per_search.append({
                "seed": record["seed"], "search": name, "steps": found["steps"],
                "planned_steps": found["planned_steps"],
                "search_s": found["compute_s"], "search_share": found["compute_s"] / base,
                "blocks": format_list(found["blocks"]), "num_blocks": len(found["blocks"]),
                "jaccard_with_unstopped": jaccard(set(found["blocks"]), set(reference["blocks"])),
                "jaccard_with_long": jaccard(set(found["blocks"]), set(record["searches"]["long"]["blocks"])),
                "all_blocks_finetune_s": base,
                "pipeline_ratio": (found["compute_s"] + runs[f"flexora ({name})"]["compute_s"]) / base,
                "test_accuracy": runs[f"flexora ({name})"]["test_accuracy"], "stop_reason": found["stop_reason"],
            })
    return {"arms": arms, "per_search": per_search}


def format_list(blocks: list[int]) -> str:
    from flexora_tune.blocks import format_blocks

    return format_blocks(blocks)


def plot_trajectories(seeds: list[dict[str, Any]], path: Path) -> Path:
    """Per seed: how much the long search's selection at each step overlaps its final selection, and where the
    sized search and the stopped long search ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for record in seeds:
        long = record["searches"]["long"]
        final = set(long["blocks"])
        overlap = [jaccard(set(chosen), final) for chosen in selections(long)]
        line, = ax.plot(long["trajectory_steps"], overlap, marker=".", label=f"seed {record['seed']}")
        ax.axvline(record["searches"]["long, stopped"]["steps"], color=line.get_color(), linestyle="--", linewidth=1)
    ax.axvline(seeds[0]["searches"]["sized"]["planned_steps"], color="grey", linestyle=":", linewidth=1.5,
               label="sized search length")
    ax.set_xlabel("search step")
    ax.set_ylabel("Jaccard overlap with the final selection")
    ax.set_ylim(0, 1.05)
    ax.set_title("Long search: selection vs its final one (dashed: where stop-when-stable ended)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_markdown(path: Path, result: dict[str, Any], info: dict[str, Any], command: str,
                   load: dict[str, float], settings: dict[str, Any]) -> None:
    summary = result["summary"]
    text = header_markdown("Flexora search budget, stop-when-stable and the small-data regime", info, command, load)
    text += (f"\n- Model `{settings['model']}`, task `{settings['task']}` (split sizes {settings['sizes']}); "
             f"fine-tune settings `{json.dumps(settings['finetune'])}`; search settings "
             f"`{json.dumps(settings['search'])}`; long search {settings['long_steps']} steps; stop-when-stable "
             f"window {settings['window']}; seeds {settings['seeds']}.\n- `compute_s` counts training and "
             "validation evaluation; the test set is evaluated apart and never chooses anything. *pipeline*: "
             "search + fine-tune on its selection, over one all-blocks fine-tune of the same seed.\n\n")
    text += "## Test accuracy per arm (mean ± standard error over seeds, [min, max])\n\n"
    text += markdown_table(
        ["arm", "test accuracy", "[min, max]", "val accuracy", "blocks (mean)"],
        [[a["arm"], f"{fmt(a['test_mean'], 3)} ± {fmt(a['test_se'], 3)}",
          f"[{fmt(a['test_min'], 3)}, {fmt(a['test_max'], 3)}]", f"{fmt(a['val_mean'], 3)} ± {fmt(a['val_se'], 3)}",
          fmt(a["num_blocks_mean"], 1)] for a in summary["arms"]])
    text += "\n\n## Per seed and search: cost, stop-when-stable, overlap\n\n"
    text += markdown_table(
        ["seed", "search", "steps run / planned", "search (s)", "search / all-blocks fine-tune",
         "pipeline / all-blocks", "selection", "Jaccard with unstopped", "Jaccard with long",
         "test accuracy", "why it ended"],
        [[r["seed"], r["search"], f"{r['steps']} / {r['planned_steps']}", fmt(r["search_s"], 0),
          fmt(r["search_share"]), fmt(r["pipeline_ratio"]), r["blocks"], fmt(r["jaccard_with_unstopped"]),
          fmt(r["jaccard_with_long"]), fmt(r["test_accuracy"], 3), r["stop_reason"]] for r in summary["per_search"]])
    text += "\n\n## Other stop-when-stable windows, replayed on the unstopped searches\n\n"
    text += markdown_table(["seed", "search", "window", "would stop at step", "of", "blocks", "Jaccard with unstopped"],
                           [[r["seed"], r["search"], r["window"], r["stop_step"], r["full_steps"], r["num_blocks"],
                             fmt(r["jaccard_with_full"])] for rec in result["seeds"] for r in rec["replay"]])
    text += f"\n\n![selection during the long search]({path.stem}_trajectory.png)\n"
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
    parser.add_argument("--long-steps", type=int, default=None,
                        help="steps of the long search (default: the fine-tune's step count)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None, help="result stem (default search_budget, or *_tiny_smoke)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.name or ("search_budget_tiny_smoke" if args.model == "tiny" else "search_budget")
    command, info, load = command_line(), machine_info(), LoadSampler()
    from flexora_tune.finetune import FinetuneSettings, planned_steps, settings_from
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
        long_steps = args.long_steps or planned_steps(len(data.train), settings_from(FinetuneSettings, tune))
        seeds = []
        for seed in range(args.seeds):
            load.sample()
            seeds.append(run_seed(model, data, seed, tune, search, args.window, windows, long_steps))
    load.sample()
    shown_task = "tiny keyword CSV" if args.model == "tiny" else args.task
    result = {"settings": {"model": args.model, "task": shown_task, "finetune": tune, "search": search,
                           "long_steps": long_steps, "window": args.window, "seeds": args.seeds,
                           "sizes": data.sizes()},
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
