"""Flexora, stage 1: learn one gate per block by bilevel optimisation, keep the blocks whose gate ends high,
then fine-tune fresh LoRA on those blocks only.

Modules: `settings` (SearchSettings), `sizing` (how long a search runs), `selection` (rules on alpha and the
stop-when-stable criterion), `loop` (`BilevelLoop`, the method itself, on any peft model), `result`
(`SelectionResult`) and `api` (`prepare_search`, `search_layers`, `run_pipeline`).
"""

from .api import PipelineResult, prepare_search, run_pipeline, search_layers
from .loop import STATE_FILE, BilevelLoop, SearchProgress
from .result import SelectionResult
from .selection import rank_correlation, select_blocks, settled_correlation
from .settings import HYPERGRADIENTS, RULES, SearchSettings
from .sizing import REFERENCE_SEARCH_SET, SHORT_SEARCH, default_search_steps, search_set_size

__all__ = [
    "HYPERGRADIENTS",
    "REFERENCE_SEARCH_SET",
    "RULES",
    "SHORT_SEARCH",
    "STATE_FILE",
    "BilevelLoop",
    "PipelineResult",
    "SearchProgress",
    "SearchSettings",
    "SelectionResult",
    "default_search_steps",
    "prepare_search",
    "rank_correlation",
    "run_pipeline",
    "search_layers",
    "search_set_size",
    "select_blocks",
    "settled_correlation",
]
