"""The one search-space encoding every strategy shares: a dict of per-block 0/1 choices.

``config["layers"] = {"l00": 1, "l01": 0, ...}`` is what OptunaSearch needs (a list of domains crashes
its converter); searchers that think in lists may give ``config["blocks"] = [0, 3]`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..blocks import BlockSelection, format_blocks, parse_block_list  # noqa: F401  (format_blocks re-exported)

LAYERS_KEY = "layers"
BLOCKS_KEY = "blocks"
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def layer_key(index: int, num_blocks: int) -> str:
    """The key of block `index`: ``l00`` .. ``l31`` (zero-padded so keys sort in block order)."""
    return f"l{index:0{max(2, len(str(num_blocks - 1)))}d}"


def layer_keys(num_blocks: int) -> list[str]:
    return [layer_key(i, num_blocks) for i in range(num_blocks)]


def encode_layers(blocks: Iterable[int], num_blocks: int) -> dict[str, int]:
    """A block set as the per-block 0/1 dict of ``config["layers"]``."""
    chosen = set(blocks)
    return {layer_key(i, num_blocks): int(i in chosen) for i in range(num_blocks)}


def decode_layers(layers: Mapping[str, Any]) -> BlockSelection:
    """The selection a ``config["layers"]`` dict encodes (keys ``l<i>``, values 0/1 or bools)."""
    mask: dict[int, int] = {}
    for key, value in layers.items():
        if not (isinstance(key, str) and key[:1] == "l" and key[1:].isdigit()):
            raise ValueError(f"layers keys are 'l00', 'l01', ... (one per block), got {key!r}")
        if value not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"layers[{key!r}] must be 0 or 1, got {value!r}")
        mask[int(key[1:])] = int(value)
    if sorted(mask) != list(range(len(mask))):
        raise ValueError(f"layers must name every block 0..L-1 exactly once, got keys {sorted(layers)}")
    return BlockSelection.from_mask([mask[i] for i in range(len(mask))])


def selection_from_config(config: Mapping[str, Any], num_blocks: int | None) -> BlockSelection | None:
    """The block subset in a trial config: ``layers`` (0/1 dict) or ``blocks`` (list); None when neither.

    `num_blocks` (the model's L) checks the subset fits the model; a ``blocks`` list needs it.
    """
    layers, blocks = config.get(LAYERS_KEY), config.get(BLOCKS_KEY)
    if layers is not None and blocks is not None:
        raise ValueError("give the subset once: config['layers'] (0/1 per block) or config['blocks']")
    if layers is not None:
        if not isinstance(layers, Mapping):
            raise TypeError(f"config['layers'] must be a dict like {{'l00': 1, 'l01': 0}}: {type(layers)}")
        selection = decode_layers(layers)
        if num_blocks is not None and selection.num_blocks_total != num_blocks:
            raise ValueError(f"config['layers'] has {selection.num_blocks_total} entries but the model has "
                             f"{num_blocks} blocks")
        return selection
    if blocks is not None:
        if isinstance(blocks, str):
            blocks = parse_block_list(blocks)
        if num_blocks is None:
            raise ValueError("config['blocks'] needs the model's number of blocks")
        return BlockSelection(tuple(blocks), num_blocks)
    return None


def num_blocks_of(model: str, trust_remote_code: bool = False) -> int:
    """The number of transformer blocks of `model`, read from its config (no weights loaded)."""
    from ..models import load_config

    config = load_config(model, trust_remote_code)
    for attr in _LAYER_COUNT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot read the number of blocks of {model!r} from its config; pass num_blocks=")


def is_number(value: Any) -> bool:
    """A finite real number (not NaN, not inf, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
