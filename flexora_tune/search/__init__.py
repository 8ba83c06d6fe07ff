"""Ray Tune searchers over transformer-block subsets, all in one encoding (``config["layers"]``):
Flexora, uniform random subsets, TPE (an Optuna study driven by ask/tell) and static rules; and `ArmsSearcher`,
which runs many of them (the arms of a comparison) as one Tune experiment."""

from .arms import ARM_STRATEGIES, comparison_arms, planned_finetunes
from .encoding import decode_layers, encode_layers, layer_key, num_blocks_of, selection_from_config
from .flexora import FlexoraSearcher
from .multiplex import ArmBudgetStopper, ArmsSearcher, Deferred, arm_name, arm_of_result, parse_arm
from .probe import ProbeSearcher
from .random_subsets import RandomLayerSearcher
from .static import StaticLayerSearcher
from .tpe import LayerOptunaSearch, startup_trials, tpe_searcher

__all__ = [
    "ARM_STRATEGIES",
    "ArmBudgetStopper",
    "ArmsSearcher",
    "Deferred",
    "FlexoraSearcher",
    "LayerOptunaSearch",
    "ProbeSearcher",
    "RandomLayerSearcher",
    "StaticLayerSearcher",
    "arm_name",
    "arm_of_result",
    "comparison_arms",
    "decode_layers",
    "encode_layers",
    "layer_key",
    "num_blocks_of",
    "parse_arm",
    "planned_finetunes",
    "selection_from_config",
    "startup_trials",
    "tpe_searcher",
]
