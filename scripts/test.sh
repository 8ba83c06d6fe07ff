#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
.venv/bin/ruff check flexora_tune tests
exec .venv/bin/python -m pytest -q --durations=15 "$@"
