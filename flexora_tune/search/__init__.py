"""Ray Tune searchers over transformer-block subsets, all in one encoding (``config["layers"]``):
Flexora, uniform random subsets, TPE (Ray's OptunaSearch) and static rules."""

from .encoding import decode_layers, encode_layers, layer_key, num_blocks_of, selection_from_config
from .flexora import FlexoraSearcher
from .random_subsets import RandomLayerSearcher
from .static import StaticLayerSearcher
from .tpe import LayerOptunaSearch, tpe_searcher

__all__ = [
    "FlexoraSearcher",
    "LayerOptunaSearch",
    "RandomLayerSearcher",
    "StaticLayerSearcher",
    "decode_layers",
    "encode_layers",
    "layer_key",
    "num_blocks_of",
    "selection_from_config",
    "tpe_searcher",
]
