"""The `flexora-tune` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from .guards import at_least, device_option, loader_options, number


def block_list_arg(text: str) -> list[int]:
    """Parse ``"0,3,5-7"`` into ``[0, 3, 5, 6, 7]`` (see `blocks.parse_block_list`)."""
    from .blocks import parse_block_list

    try:
        return parse_block_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MIN_TOKENS = 8  # TaskSpec.max_length and SearchSettings.search_max_length: at least this many tokens


def _loader(args: argparse.Namespace) -> dict[str, Any]:
    """Model-loader options of this command: ``trust_remote_code`` only with --trust-remote-code."""
    return loader_options(vars(args))


def _task_arg(args: argparse.Namespace) -> str | dict[str, Any]:
    overrides = {k: v for k, v in {
        "text_column": args.text_column, "label_column": args.label_column,
        "prompt_column": args.prompt_column, "answer_column": args.answer_column,
        "max_examples": args.max_examples, "max_length": args.max_length, "val_size": args.val_size,
        "test_size": args.test_size, "search_val_size": args.search_val_size,
    }.items() if v is not None}
    return {"source": args.task, **overrides} if overrides else args.task


def _add_model_task(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and task")
    group.add_argument("--model", default="default",
                       help="'default' (embedded SmolLM2-135M), 'minilm', an HF model id, or a local directory "
                            "saved with save_pretrained (default: %(default)s)")
    group.add_argument("--task", default="default",
                       help="'default' (BBC News topics), 'bbc-lm', a local .csv/.jsonl file, or an HF dataset "
                            "name (default: %(default)s)")
    group.add_argument("--text-column", help="classification text column of a CSV/JSONL task (default: text)")
    group.add_argument("--label-column", help="classification label column (default: label)")
    group.add_argument("--prompt-column", help="causal-LM prompt column (default: prompt)")
    group.add_argument("--answer-column", help="causal-LM answer column (default: answer)")
    group.add_argument("--max-examples", type=at_least(8), help="use at most this many examples of the dataset")
    group.add_argument("--max-length", type=at_least(MIN_TOKENS), help="token cut-off per example")
    group.add_argument("--val-size", type=number, help="validation split: a count, or a fraction if < 1")
    group.add_argument("--test-size", type=number, help="test split: a count, or a fraction if < 1")
    group.add_argument("--search-val-size", type=number, help="Flexora's search-validation split")
    _add_trust(group)


def _add_trust(group: Any) -> None:
    group.add_argument("--trust-remote-code", action="store_true",
                       help="run the Python code a model directory or hub repository ships (its auto_map); only "
                            "for code you have read and trust (default: never run it, never ask)")


FINETUNE_BUDGET = ("epochs", "max_steps", "max_train_examples")


def _add_training(parser: argparse.ArgumentParser, *, single_run: bool = True, evaluating: bool = True) -> None:
    """Training options; `single_run` adds --seed/--threads (a sweep sets those per trial), `evaluating`
    --eval-every (a search alone only uses the fine-tune's budget, to size itself)."""
    group = parser.add_argument_group("training")
    if single_run:
        group.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
        group.add_argument("--threads", type=at_least(1), help="torch intra-op threads")
    group.add_argument("--epochs", type=at_least(1), help="fine-tuning epochs (default: 3)")
    group.add_argument("--max-steps", type=at_least(1), help="cap on fine-tuning optimizer steps")
    group.add_argument("--max-train-examples", type=at_least(1),
                       help="fine-tune (and search) on only the first N training examples (default: all)")
    if evaluating:
        group.add_argument("--eval-every", type=at_least(1), help="evaluate every N steps instead of after each epoch")
    group.add_argument("--lr", type=number, help="LoRA learning rate (default: 1e-4); a run whose loss diverges "
                                                 "stops, naming the step")
    group.add_argument("--batch-size", type=at_least(1), help="batch size (default: 8)")
    group.add_argument("--rank", type=at_least(1), dest="r", help="LoRA rank (default: 8)")
    group.add_argument("--device", type=device_option, help="cpu, cuda, cuda:1, mps (default: cuda if available)")


def _add_search(parser: argparse.ArgumentParser, steps_flag: str) -> None:
    group = parser.add_argument_group("Flexora search")
    group.add_argument(steps_flag, type=at_least(1), dest="search_steps",
                       help="search steps (default: the reference's share of the fine-tune's steps: one pass "
                            "over the search set, shortened as much as --max-steps shortens the fine-tune)")
    group.add_argument("--stop-when-stable", type=at_least(0), metavar="STEPS",
                       help="end the search once the selection has not changed for STEPS steps and alpha's "
                            f"ranking has settled (default: {_default_stable()}; 0 runs every step)")
    group.add_argument("--search-max-length", type=at_least(MIN_TOKENS),
                       help="token cut-off of search examples (default: the task's)")
    group.add_argument("--val-batches", type=at_least(1), help="search-validation batches per gate step (default: 1)")
    group.add_argument("--alpha-lr", type=number, help="learning rate of the gates' alpha (default: 0.01)")


def _default_stable() -> int | None:
    from .flexora import SearchSettings

    return SearchSettings.stop_when_stable


def _search_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {"steps": args.search_steps, "search_max_length": args.search_max_length,
                "val_batches": args.val_batches, "alpha_lr": args.alpha_lr}
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.stop_when_stable is not None:
        settings["stop_when_stable"] = args.stop_when_stable or None
    return settings


def _training_settings(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _selection_for(args: argparse.Namespace, path: str) -> tuple[Any, Any]:
    """The `BlockSelection` in file `path` and `args.model`'s `BlockLayout`, checked to have the same block
    count (no weights loaded)."""
    from .files import read_selection_file
    from .models import load_model_layout

    selection = read_selection_file(path)
    layout = load_model_layout(args.model, **_loader(args))
    if selection.num_blocks_total != layout.num_blocks:
        raise ValueError(f"selection {path} is for a model with {selection.num_blocks_total} blocks but {args.model!r} "
                         f"has {layout.num_blocks}; use a selection made for this model (flexora-tune search "
                         f"--model {args.model})")
    return selection, layout


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .files import check_output_file, write_output
    from .finetune import finetune
    from .floors import majority_line
    from .guards import check_local_device

    if args.out:
        check_output_file(args.out, "--out")
    check_local_device(args.device)
    blocks = _selection_for(args, args.selection)[0] if args.selection else args.blocks
    settings = _training_settings(args, [*FINETUNE_BUDGET, "lr", "batch_size", "r", "threads", "device",
                                         "eval_every"])
    result = finetune(args.model, _task_arg(args), blocks=blocks, seed=args.seed, verbose=True, **settings,
                      **_loader(args))
    summary = {k: v for k, v in result.to_dict().items() if k != "history"}
    print(json.dumps(summary, indent=2))
    print(majority_line(_task_arg(args), result.val_accuracy, args.max_train_examples))
    if args.out:
        write_output(args.out, json.dumps(result.to_dict(), indent=2), "fine-tune result")
    return 0


def _strategies(text: str) -> tuple[str, ...]:
    from .compare import STRATEGIES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown strategies {unknown}; choose from {','.join(STRATEGIES)}")
    return names


def _print_summary(out: str | Path, metric: str | None = None) -> None:
    """Print the summary table of results folder `out`, headed by the metric it was ranked by."""
    from .report import format_summary
    from .results import DEFAULT_METRIC, META_FILE, SUMMARY_CSV_FILE

    if metric is None:
        meta = Path(out) / META_FILE
        metric = (json.loads(meta.read_text()).get("metric") if meta.is_file() else None) or DEFAULT_METRIC
    print(format_summary(pd.read_csv(Path(out) / SUMMARY_CSV_FILE), metric))


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    os.environ["FLEXORA_TUNE_COMMAND"] = "flexora-tune " + " ".join(sys.argv[1:])
    settings = {**_training_settings(args, [*FINETUNE_BUDGET, "lr", "batch_size", "r", "device", "eval_every"]),
                **_loader(args)}
    search = _search_settings(args)
    if search:
        settings["search"] = search
    compare(
        out=args.out, model=args.model, task=_task_arg(args), strategies=args.strategies, seeds=args.seeds,
        trials=args.trials, searches=args.searches, budget=args.budget, budget_s=args.budget_s, k=args.k,
        settings=settings, address=args.address, storage_path=args.storage_path, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, resume=args.resume,
        max_failures=args.max_failures, metric=args.metric, mode=args.mode, reference=args.reference,
    )
    _print_summary(args.out, args.metric)
    print(f"results in {Path(args.out).resolve()}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .files import check_output_dir
    from .report import write_report

    check_output_dir(args.dir, "DIR")
    written = write_report(args.dir, metric=args.metric, reference=args.reference)
    _print_summary(args.dir, args.metric)
    for path in written.values():
        print(f"wrote {path}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .files import check_output_file, write_output
    from .flexora import search_layers
    from .floors import majority_line
    from .guards import check_local_device

    check_output_file(args.out, "--out")
    check_local_device(args.device)
    settings = {**_training_settings(args, ["lr", "batch_size", "r", "threads", "device"]), **_search_settings(args),
                **_loader(args)}
    if args.top_k is not None:
        settings.update(rule="top_k", top_k=args.top_k)
    sized_for = _training_settings(args, [*FINETUNE_BUDGET, "batch_size"])
    result = search_layers(args.model, _task_arg(args), args.seed, finetune=sized_for, verbose=True, **settings)
    write_output(args.out, result.to_json(), "selection")
    print(f"selected blocks {list(result.blocks)} of {result.num_blocks_total} "
          f"({result.compute_s:.0f}s); wrote {args.out}")
    print(majority_line(_task_arg(args), None, args.max_train_examples))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .files import check_output_dir

    check_output_dir(args.out, "--out")
    selection, layout = _selection_for(args, args.selection)
    config = selection.to_lora_config(layout, target_modules=args.target_modules or None, r=args.rank,
                                      lora_alpha=args.lora_alpha)
    config.save_pretrained(args.out)
    print(f"wrote {Path(args.out) / 'adapter_config.json'}: LoRA r={args.rank} on blocks {list(selection.blocks)}"
          f" of {selection.num_blocks_total} ({', '.join(config.target_modules)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexora-tune",
        description="Choose which transformer blocks get LoRA adapters (Flexora), compare layer-selection "
                    "strategies under one compute budget, and export the winner as a peft LoraConfig.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = commands.add_parser("finetune", help="fine-tune fresh LoRA on a given block list or selection",
                             description="Fine-tune fresh LoRA on exactly the given blocks and report "
                                         "validation and test accuracy.")
    _add_model_task(ft)
    _add_training(ft)
    which = ft.add_mutually_exclusive_group()
    which.add_argument("--blocks", type=block_list_arg, help="blocks to adapt, e.g. 0,3,5-7 (default: all)")
    which.add_argument("--selection", help="a selection JSON file (from `search` or `compare`)")
    ft.add_argument("--out", help="write the result (with its per-epoch history) to this JSON file")
    ft.set_defaults(handler=_cmd_finetune)

    cmp = commands.add_parser(
        "compare", help="compare layer-selection strategies under one budget (Ray Tune)",
        description="Run several layer-selection strategies on one model and task, with several seeds, under "
                    "the same budget per strategy and seed, through Ray Tune on this machine or a cluster: "
                    "every (strategy, seed) arm runs in one Tune experiment, all in flight together. "
                    "Writes OUT/trials.csv, OUT/summary.csv, plots (OUT/*.png), OUT/best_selection.json and "
                    "OUT/best_lora_config/. The winner is chosen by --metric (validation accuracy by default); "
                    "test accuracy is only reported.")
    _add_model_task(cmp)
    _add_training(cmp, single_run=False)
    _add_search(cmp, "--search-steps")
    cmp.add_argument("--strategies", type=_strategies, default=("flexora", "random", "all", "last-k"),
                     help="comma-separated, from flexora,random,tpe,all,first-k,last-k,lora-norm,grad-norm "
                          "(default: flexora,random,all,last-k)")
    cmp.add_argument("--seeds", type=at_least(1), default=1, help="seeds per strategy (default: %(default)s)")
    cmp.add_argument("--trials", type=at_least(1), default=3,
                     help="fine-tunes per strategy and seed (Flexora and the probes: plus their search or "
                          "probe trial); static rules need one (default: %(default)s)")
    cmp.add_argument("--searches", type=at_least(1), default=1, help="Flexora searches per seed; with several, "
                     "their consensus is fine-tuned first (default: %(default)s)")
    cmp.add_argument("--budget", type=number,
                     help="compute per strategy and seed in fine-tune equivalents (the FLOPs of one all-blocks "
                          "fine-tune of this comparison), searches and probes included")
    cmp.add_argument("--budget-s", type=number,
                     help="compute seconds per strategy and seed, searches included (wall time: other load moves it)")
    cmp.add_argument("--k", type=at_least(1),
                     help="blocks for first-k, last-k, random, tpe and the probes (default: Flexora's count)")
    cmp.add_argument("--metric", default="val_accuracy", choices=("val_accuracy", "val_loss"),
                     help="validation metric that ranks trials and picks the winner (default: %(default)s)")
    cmp.add_argument("--mode", choices=("max", "min"),
                     help="whether higher or lower --metric is better (default: max for accuracy, min for loss)")
    cmp.add_argument("--reference",
                     help="strategy every other one is compared with, seed by seed (default: all, when it runs)")
    cmp.add_argument("--out", default="results/compare", help="results folder (default: %(default)s)")
    ray_group = cmp.add_argument_group("Ray")
    ray_group.add_argument("--address", help="an existing Ray cluster (e.g. auto or ray://head:10001)")
    ray_group.add_argument("--storage-path", help="Tune storage, shared by all nodes on a cluster (s3://, gs://, NFS)")
    ray_group.add_argument("--cpus-per-trial", type=number, default=1, help="(default: %(default)s)")
    ray_group.add_argument("--gpus-per-trial", type=partial(number, zero=True), default=0,
                           help="fractions pack trials (default: 0)")
    ray_group.add_argument("--max-concurrent", type=at_least(1),
                           help="trials at once (default: every slot: the cluster's CPUs / --cpus-per-trial, "
                                "and GPUs / --gpus-per-trial when trials ask for GPUs)")
    ray_group.add_argument("--resume", action="store_true",
                           help="continue an interrupted comparison in --out (same --storage-path): its one "
                                "experiment is restored with every arm's searcher state; finished trials are kept, "
                                "interrupted ones continue from their checkpoints, errored ones are retried")
    ray_group.add_argument("--max-failures", type=at_least(-1), default=1,
                           help="retries per trial after a failure such as a lost node, each from the trial's "
                                "last checkpoint; -1 retries forever (default: %(default)s)")
    cmp.set_defaults(handler=_cmd_compare)

    rep = commands.add_parser("report", help="re-render tables and plots from a results folder (no training)",
                              description="Rebuild summary.csv, summary.md, the plots and the best selection "
                                          "from DIR/trials.csv alone.")
    rep.add_argument("dir", help="a results folder written by `compare`")
    rep.add_argument("--metric", help="validation metric that picks the winner (default: from meta.json)")
    rep.add_argument("--reference",
                     help="strategy the paired verdicts compare with (default: from meta.json, else all)")
    rep.set_defaults(handler=_cmd_report)

    se = commands.add_parser("search", help="run a Flexora search and write the selection",
                             description="Learn per-block gates (Flexora stage 1) and write the selected blocks "
                                         "as a SelectionResult JSON.")
    _add_model_task(se)
    _add_training(se, evaluating=False)
    _add_search(se, "--steps")
    se.add_argument("--top-k", type=at_least(1), help="keep the k highest-gate blocks instead of those above the mean")
    se.add_argument("--out", default="selection.json", help="(default: %(default)s)")
    se.set_defaults(handler=_cmd_search)

    ex = commands.add_parser("export", help="turn a selection into a peft adapter config",
                             description="Write adapter_config.json (a peft LoraConfig with layers_to_transform) "
                                         "for a selection JSON from `search` or `compare`.")
    ex.add_argument("selection", help="selection JSON (best_selection.json or a search result)")
    ex.add_argument("--model", default="default", help="the model the selection is for (default: %(default)s)")
    ex.add_argument("--target-modules", nargs="+", help="default: the family's query/value projections")
    ex.add_argument("--rank", type=at_least(1), default=8, help="(default: %(default)s)")
    ex.add_argument("--lora-alpha", type=at_least(1), default=16, help="(default: %(default)s)")
    _add_trust(ex)
    ex.add_argument("--out", default="lora_config", help="folder for adapter_config.json (default: %(default)s)")
    ex.set_defaults(handler=_cmd_export)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C left behind, said truthfully per command."""
    if args.command == "compare":
        from .compare import EXPERIMENT
        from .guards import has_progress, storage_location
        from .results import EXPERIMENTS_FILE

        out = Path(args.out).absolute()
        if has_progress(out, storage_location(out, args.storage_path), [EXPERIMENT], EXPERIMENTS_FILE):
            return f"interrupted; finished results are kept; continue with --resume (results in {out})"
        return f"interrupted before any experiment saved its state; nothing to resume in {out}: run it again"
    if args.command in ("finetune", "search"):
        what = "selection" if args.command == "search" else "result"
        return f"interrupted; nothing was written (the {what} is written only when the run ends)"
    return f"interrupted; {args.dir if args.command == 'report' else args.out} may be incomplete: run it again"


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a bad input ends it with a one-line message and exit code 2 (argparse's own errors
    too), a Ctrl-C with exit code 130 and what was kept."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"flexora-tune {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as exc:
        # OSError covers a missing file, NotADirectoryError, IsADirectoryError, FileExistsError,
        # PermissionError, a full disk and ConnectionError (e.g. no Ray cluster at --address)
        print(f"flexora-tune {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
