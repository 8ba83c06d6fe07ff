"""A GPU node: Flexora against plain LoRA, random subsets and last-k on a Llama-class model and HellaSwag.

Not run in CI (it downloads a model and a dataset from the HF hub). On a node with CUDA and a hub token:

    pip install torch --index-url https://download.pytorch.org/whl/cu128   # your CUDA build first
    FLEXORA_VENV=system bash scripts/setup.sh
    python examples/gpu_llama_commonsense.py --model meta-llama/Llama-3.2-1B --examples 6000 --gpus-per-trial 0.5

HellaSwag rows become prompt -> answer with the four endings as choices; accuracy scores each ending by
its likelihood, as the benchmark is scored. Trials run in bf16 on the GPU Ray assigns them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexora_tune.compare import compare


def hellaswag_jsonl(path: Path, examples: int, split: str = "train") -> Path:
    """Write `examples` HellaSwag rows as prompt/answer/choices JSON Lines."""
    import datasets

    rows = datasets.load_dataset("Rowan/hellaswag", split=split).select(range(examples))
    with path.open("w") as f:
        for row in rows:
            endings = [e.strip() for e in row["endings"]]
            f.write(json.dumps({"prompt": f"{row['activity_label']}: {row['ctx']}",
                                "answer": endings[int(row["label"])], "choices": endings}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.2-1B")
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--gpus-per-trial", type=float, default=1.0)
    parser.add_argument("--address", default=None, help="a Ray cluster, e.g. auto")
    parser.add_argument("--storage-path", default=None, help="shared storage on a multi-node cluster")
    parser.add_argument("--out", default="results/hellaswag")
    args = parser.parse_args(argv)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = hellaswag_jsonl(Path(args.out) / "hellaswag.jsonl", args.examples)
    task = {"source": str(data), "kind": "causal_lm", "max_length": 256, "prompt_template": "{text}",
            "search_val_size": 200, "val_size": 500, "test_size": 1000}
    compare(out=args.out, model=args.model, task=task, strategies=("flexora", "all", "random", "last-k"),
            seeds=args.seeds, trials=args.trials, gpus_per_trial=args.gpus_per_trial, cpus_per_trial=4,
            address=args.address, storage_path=args.storage_path,
            settings={"epochs": 3, "lr": 1e-4, "batch_size": 8, "dtype": "bfloat16"})


if __name__ == "__main__":
    main()
