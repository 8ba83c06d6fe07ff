#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh), then runs the main job: a short comparison of layer-selection
# strategies (Flexora, random subsets, all blocks, last-k) on the embedded default model and task, in the
# small-data regime where all-block LoRA overfits (96 training articles, 5 epochs, evaluated at the end).
# Flexora's search is sized by the default rule (one pass over the 96 articles).
# Results land in results/quickstart/; extra arguments are passed to `flexora-tune compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/flexora-tune compare --model default --task default \
  --strategies flexora,random,all,last-k --seeds 1 --trials 1 \
  --max-length 48 --val-size 150 --test-size 300 --max-train-examples 96 --epochs 5 --eval-every 60 --lr 5e-3 \
  --cpus-per-trial 2 --out results/quickstart "$@"
