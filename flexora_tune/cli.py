"""The `flexora-tune` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_blocks(text: str) -> list[int]:
    """Parse ``"0,3,5-7"`` into ``[0, 3, 5, 6, 7]``."""
    blocks: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                blocks.extend(range(lo, hi + 1))
            else:
                blocks.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad block list {text!r}; use e.g. 0,3,5-7") from None
    return blocks


def _task_arg(args: argparse.Namespace) -> str | dict[str, Any]:
    overrides = {k: v for k, v in {
        "text_column": args.text_column, "label_column": args.label_column,
        "prompt_column": args.prompt_column, "answer_column": args.answer_column,
        "max_examples": args.max_examples, "max_length": args.max_length,
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
    group.add_argument("--max-examples", type=int, help="use at most this many examples of the dataset")
    group.add_argument("--max-length", type=int, help="token cut-off per example")


def _add_training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    group.add_argument("--epochs", type=int, help="fine-tuning epochs (default: 3)")
    group.add_argument("--max-steps", type=int, help="cap on optimizer steps")
    group.add_argument("--lr", type=float, help="LoRA learning rate (default: 1e-4)")
    group.add_argument("--batch-size", type=int, help="batch size (default: 8)")
    group.add_argument("--rank", type=int, dest="r", help="LoRA rank (default: 8)")
    group.add_argument("--threads", type=int, help="torch intra-op threads")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _training_settings(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    blocks = args.blocks
    if args.selection:
        from .blocks import BlockSelection

        blocks = list(BlockSelection.from_json(Path(args.selection).read_text()).blocks)
    settings = _training_settings(args, ["epochs", "max_steps", "lr", "batch_size", "r", "threads", "device"])
    result = finetune(args.model, _task_arg(args), blocks=blocks, seed=args.seed, verbose=True, **settings)
    summary = {k: v for k, v in result.to_dict().items() if k != "history"}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
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
    which.add_argument("--blocks", type=parse_blocks, help="blocks to adapt, e.g. 0,3,5-7 (default: all)")
    which.add_argument("--selection", help="a selection JSON file (from `search` or `compare`)")
    ft.add_argument("--out", help="write the result (with its per-epoch history) to this JSON file")
    ft.set_defaults(handler=_cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as exc:
        print(f"flexora-tune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
