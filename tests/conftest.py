"""Shared fixtures: tiny local models and datasets, and one Ray session for the whole test run."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 4-block Llama saved with save_pretrained (model + tokenizer)."""
    return tiny.save_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """A 2-class keyword classification CSV with columns text,label (200 rows)."""
    return tiny.write_csv(tmp_path_factory.mktemp("data") / "keywords.csv", tiny.classification_rows(200))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session (2 CPUs, 1 logical GPU so GPU scheduling is testable without a device) shared
    by every test that needs Ray; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield ray
    ray.shutdown()
