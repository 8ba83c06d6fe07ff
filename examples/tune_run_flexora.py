"""Flexora as a Ray Tune searcher: one search trial picks the blocks, then fine-tunes of its selection.

    python examples/tune_run_flexora.py                      # embedded SmolLM2 on BBC News (minutes)
    python examples/tune_run_flexora.py --model DIR --task data.csv --steps 4
"""

from __future__ import annotations

import argparse

from ray import tune

from flexora_tune import FlexoraSearcher, SelectionResult, trainable


def main(argv: list[str] | None = None) -> SelectionResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="default")
    parser.add_argument("--steps", type=int, default=30, help="search steps and fine-tune steps")
    parser.add_argument("--storage", default=None, help="Tune storage path (default: ~/ray_results)")
    args = parser.parse_args(argv)

    analysis = tune.run(
        trainable,
        config={"model": args.model, "task": args.task, "steps": args.steps, "max_steps": args.steps, "lr": 1e-3},
        search_alg=FlexoraSearcher(metric="val_accuracy", mode="max"),
        num_samples=4,
        max_concurrent_trials=2,
        storage_path=args.storage,
        verbose=0,
    )
    df = analysis.dataframe()
    print(df[["strategy", "stage", "variant", "blocks", "val_accuracy", "test_accuracy", "compute_s"]])
    best = SelectionResult.from_analysis(analysis)
    print("selected blocks:", list(best.blocks), "of", best.num_blocks_total)
    print(best.to_lora_config())
    return best


if __name__ == "__main__":
    main()
