#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the main job on the embedded default model and task.
# Extra arguments are passed to the flexora-tune command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/flexora-tune finetune --model default --task default --blocks 20-29 --max-steps 40 --lr 1e-3 \
  --out results/quickstart/finetune.json "$@"
