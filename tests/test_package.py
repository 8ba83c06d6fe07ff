"""The package surface: the core imports without Ray, and the public names resolve."""

from __future__ import annotations

import subprocess
import sys

import flexora_tune


def test_core_and_search_import_no_ray():
    """GPU nodes may lack Ray: blocks, tasks, fine-tuning and the Flexora search must not pull it in."""
    code = ("import sys, flexora_tune, flexora_tune.flexora, flexora_tune.finetune, flexora_tune.gates; "
            "flexora_tune.search_layers; flexora_tune.SelectionResult; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_public_name_resolves_to_a_callable_or_class():
    for name in flexora_tune.__all__:
        assert callable(getattr(flexora_tune, name)), name
    from flexora_tune.compare import compare

    assert flexora_tune.compare_strategies is compare
