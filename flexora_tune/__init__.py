"""flexora_tune: choose which transformer blocks get LoRA (Flexora), as a Ray Tune plugin.

The core (blocks, tasks, fine-tuning, the Flexora search) is plain PyTorch + peft and imports no Ray;
the Ray Tune pieces load on first use.
"""

from .blocks import BlockLayout, BlockSelection, LoraPlacementError, find_blocks
from .finetune import FinetuneResult, FinetuneSettings, LoraSettings, finetune
from .models import ModelNotFoundError, load_model
from .tasks import TaskData, TaskError, TaskSpec, load_task

__version__ = "0.1.0"

# Names whose modules import Ray (or are heavy): resolved on first access, so `import flexora_tune`
# works on a machine without Ray.
_LAZY = {
    "search_layers": "flexora",
    "run_pipeline": "flexora",
    "SelectionResult": "flexora",
    "SearchSettings": "flexora",
    "lora_norm_ranking": "probes",
    "grad_norm_ranking": "probes",
    "ProbeResult": "probes",
    "trainable": "tune_trainable",  # not a module named `trainable`: importing it would shadow the function
    "FlexoraSearcher": "search",
    "RandomLayerSearcher": "search",
    "StaticLayerSearcher": "search",
    "tpe_searcher": "search",
    "ProbeSearcher": ("search.probe", "ProbeSearcher"),
    # the comparison's Python API (a DataFrame for notebooks); not `compare`, which the submodule would shadow
    "compare_strategies": ("compare", "compare"),
    "write_report": "report",
    "summarize": "report",
    "estimate_trial_memory": "resources",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'flexora_tune' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "BlockLayout",
    "BlockSelection",
    "FinetuneResult",
    "FinetuneSettings",
    "LoraPlacementError",
    "LoraSettings",
    "ModelNotFoundError",
    "TaskData",
    "TaskError",
    "TaskSpec",
    "find_blocks",
    "finetune",
    "load_model",
    "load_task",
]
