"""Flexora against random subsets, TPE and plain LoRA with `tune.Tuner` and ASHA, on one budget of trials.

ASHA compares fine-tunes at each evaluation and stops the subsets that fall behind; the searchers share
one trainable and one block-subset encoding, so their results land in one table.

    python examples/tuner_compare_asha.py                    # embedded SmolLM2 on BBC News (tens of minutes)
    python examples/tuner_compare_asha.py --model DIR --task data.csv --steps 8 --trials 2
"""

from __future__ import annotations

import argparse

import pandas as pd
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from flexora_tune import FlexoraSearcher, RandomLayerSearcher, StaticLayerSearcher, tpe_searcher, trainable


def searchers(trials: int) -> dict[str, tuple[object, int]]:
    """Each strategy's searcher and the number of trials it may run."""
    flexora = FlexoraSearcher(metric="val_accuracy", mode="max", neighbours=(trials - 1) // 2)
    return {
        "flexora": (flexora, flexora.planned_trials),
        "random": (RandomLayerSearcher(metric="val_accuracy", mode="max", seed=0), trials),
        "tpe": (tpe_searcher(metric="val_accuracy", mode="max", seed=0), trials),
        "all": (StaticLayerSearcher(metric="val_accuracy", mode="max", rule="all"), 1),
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="default")
    parser.add_argument("--steps", type=int, default=60, help="fine-tune steps (evaluated 3 times)")
    parser.add_argument("--trials", type=int, default=3, help="fine-tunes per strategy")
    parser.add_argument("--storage", default=None)
    args = parser.parse_args(argv)

    base = {"model": args.model, "task": args.task, "max_steps": args.steps, "eval_every": max(1, args.steps // 3),
            "steps": args.steps, "lr": 1e-3}
    frames = []
    for name, (searcher, num_samples) in searchers(args.trials).items():
        tuner = tune.Tuner(
            trainable,
            param_space=base,
            tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=num_samples, max_concurrent_trials=2,
                scheduler=ASHAScheduler(metric="val_accuracy", mode="max", time_attr="finetune_step",
                                        max_t=args.steps, grace_period=max(1, args.steps // 3)),
            ),
            run_config=tune.RunConfig(name=f"asha_{name}", storage_path=args.storage, verbose=0),
        )
        frames.append(tuner.fit().get_dataframe().assign(strategy=name))
    df = pd.concat(frames, ignore_index=True)
    columns = ["strategy", "stage", "blocks", "num_blocks", "val_accuracy", "test_accuracy", "step", "compute_s"]
    print(df[columns].sort_values(["strategy", "val_accuracy"], ascending=[True, False]).to_string(index=False))
    return df


if __name__ == "__main__":
    main()
