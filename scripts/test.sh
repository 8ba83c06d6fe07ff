#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
.venv/bin/ruff check flexora_tune tests
# The multi-process fault tests (killed drivers and workers on a real local cluster) are timing-sensitive on a
# loaded 2-core machine: a failing run is followed by one rerun of the failed tests only, and both are printed.
.venv/bin/python -m pytest -q --durations=15 "$@" && exit 0
echo "[test] rerunning the failed tests once"
exec .venv/bin/python -m pytest -q --last-failed --last-failed-no-failures none "$@"
