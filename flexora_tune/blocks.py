"""Transformer blocks: finding them in any common HF model, the block-selection value type, and peft LoRA
configs restricted to a selection (built and verified)."""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig
from torch import nn

# Attention query/value projections per family: the method's reference targets (q_proj, v_proj) and
# their counterparts elsewhere. Fused projections (GPT-2 c_attn, NeoX query_key_value) stand alone.
_PREFERRED_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("q_lin", "v_lin"),
    ("query_key_value",),
    ("c_attn",),
    ("qkv_proj",),
    ("Wqkv",),
    ("W_pack",),
)


class BlockDiscoveryError(ValueError):
    """The model has no recognisable stack of repeated transformer blocks."""


class LoraPlacementError(RuntimeError):
    """peft placed LoRA somewhere other than exactly the selected blocks and target modules."""


def format_blocks(blocks: Iterable[int] | None) -> str:
    """The text form of a block set in results and tables: ``"0,3,7"`` (``""`` for none)."""
    return "" if blocks is None else ",".join(str(int(b)) for b in sorted(blocks))


def compact_blocks(blocks: Iterable[int] | None) -> str:
    """The display form of a block set: ``[0, 1, 2, 3, 7, 8]`` -> ``"0-3,7,8"`` (runs of three or more as
    ranges; ``"-"`` for none). `parse_block_list` reads it back."""
    if not blocks:
        return "-"
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ",".join(f"{lo}-{hi}" if hi - lo >= 2 else ",".join(map(str, range(lo, hi + 1))) for lo, hi in runs)


def parse_block_list(text: str) -> list[int]:
    """Blocks a user typed: ``"0,3,5-7"`` -> ``[0, 3, 5, 6, 7]`` (commas or spaces between parts).

    Raises ValueError naming the bad part (not a number, a reversed range such as ``3-1``, or nothing given).
    """
    blocks: list[int] = []
    for part in (p for p in re.split(r"[,\s]+", text.strip()) if p):
        lo_text, dash, hi_text = part.partition("-")
        if not lo_text.isdigit() or (dash and not hi_text.isdigit()):
            raise ValueError(f"bad block list {text!r}: {part!r} is not a block index or a range like 5-7")
        lo, hi = int(lo_text), int(hi_text) if dash else int(lo_text)
        if hi < lo:
            raise ValueError(f"bad block list {text!r}: {part!r} is a reversed range; write {hi}-{lo}")
        blocks.extend(range(lo, hi + 1))
    if not blocks:
        raise ValueError(f"bad block list {text!r}: no block given; use e.g. 0,3,5-7")
    return blocks


def rank_blocks(scores: Sequence[float]) -> list[int]:
    """Block indices from the highest score to the lowest (ties: lower index first). The one ranking used
    for Flexora's alpha, TPE's start points and every probe."""
    values = [float(v) for v in scores]
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def top_k_blocks(scores: Sequence[float], k: int) -> tuple[int, ...]:
    """The `k` blocks with the highest scores, in block order (ties to the lower index)."""
    if not 0 <= k <= len(scores):
        raise ValueError(f"k must be in 0..{len(scores)} (the number of blocks), got {k}")
    return tuple(sorted(rank_blocks(scores)[:k]))


def parse_blocks(value: Any) -> tuple[int, ...] | None:
    """Block indices from a result or table cell: ``"0,3,7"``, a JSON list ``"[0, 3, 7]"``, or a sequence.

    Returns None for a missing, empty or unreadable value (e.g. a search trial that errored).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return None
        else:
            parts = [p for p in re.split(r"[,\s]+", text) if p]
            if not parts or not all(p.isdigit() for p in parts):
                return None
            return tuple(sorted(int(p) for p in parts))
    if isinstance(value, list | tuple):
        if not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in value):
            return None
        return tuple(sorted(int(b) for b in value)) or None
    return None


@dataclass(frozen=True)
class BlockLayout:
    """Where a model's repeated transformer blocks live and which modules inside them LoRA targets.

    `path` is the dotted attribute path of the block list (e.g. ``model.layers``), `pattern` its last
    component, which is what peft's ``layers_pattern`` matches.
    """

    path: str
    num_blocks: int
    target_modules: tuple[str, ...]
    linear_modules: tuple[str, ...]

    @property
    def pattern(self) -> str:
        return self.path.rsplit(".", 1)[-1]


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is a dense projection LoRA can adapt (`nn.Linear`, or GPT-2's `Conv1D`)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_blocks(model: nn.Module) -> BlockLayout:
    """Find the longest `nn.ModuleList` of same-typed blocks that contain linear layers.

    Works for Llama/Mistral/Qwen2 (``model.layers``), GPT-2 (``transformer.h``), GPT-NeoX
    (``gpt_neox.layers``), BERT/MiniLM (``encoder.layer``), DistilBERT (``transformer.layer``) and any
    other family laid out the same way. A peft-wrapped model is unwrapped first.
    """
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise BlockDiscoveryError(
            f"No repeated transformer blocks found in {type(root).__name__}: expected an nn.ModuleList of "
            "identical blocks containing linear layers (e.g. model.layers, transformer.h, encoder.layer). "
            "Pass target_modules and a model whose blocks live in such a list."
        )
    path, blocks = best
    linear_names = sorted(
        {name.rsplit(".", 1)[-1] for name, m in blocks[0].named_modules() if name and is_linear(m)}
    )
    targets = next(
        (group for group in _PREFERRED_TARGETS if all(t in linear_names for t in group)), tuple(linear_names)
    )
    return BlockLayout(
        path=path, num_blocks=len(blocks), target_modules=tuple(targets), linear_modules=tuple(linear_names)
    )


@dataclass(frozen=True)
class BlockSelection:
    """A non-empty, sorted set of block indices out of `num_blocks_total` blocks.

    The one value every strategy proposes and every fine-tune consumes; converts to and from a peft
    `LoraConfig` (``layers_to_transform``) and JSON.
    """

    blocks: tuple[int, ...]
    num_blocks_total: int

    def __post_init__(self) -> None:
        total = self.num_blocks_total
        if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
            raise ValueError(f"num_blocks_total must be a positive int, got {total!r}")
        items = list(self.blocks)
        for b in items:
            if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                raise TypeError(f"block indices must be ints, got {b!r} ({type(b).__name__})")
        items = [int(b) for b in items]
        if not items:
            raise ValueError("a block selection must contain at least one block (an empty LoRA trains nothing)")
        dupes = sorted({b for b in items if items.count(b) > 1})
        if dupes:
            raise ValueError(f"duplicate block indices {dupes}; list each block once")
        bad = [b for b in items if not 0 <= b < total]
        if bad:
            raise ValueError(
                f"block indices {bad} out of range: the model has {total} blocks, valid indices are 0..{total - 1}"
            )
        object.__setattr__(self, "blocks", tuple(sorted(items)))
        object.__setattr__(self, "num_blocks_total", int(total))

    @classmethod
    def all(cls, num_blocks_total: int) -> BlockSelection:
        return cls(range(num_blocks_total), num_blocks_total)

    @classmethod
    def from_mask(cls, mask: Sequence[int | bool]) -> BlockSelection:
        """From a 0/1 per-block mask, the encoding Ray Tune search spaces use."""
        return cls([i for i, on in enumerate(mask) if on], len(mask))

    @property
    def mask(self) -> tuple[int, ...]:
        chosen = set(self.blocks)
        return tuple(int(i in chosen) for i in range(self.num_blocks_total))

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def jaccard(self, other: BlockSelection) -> float:
        a, b = set(self.blocks), set(other.blocks)
        return len(a & b) / len(a | b)

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "num_blocks_total": self.num_blocks_total}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> BlockSelection:
        try:
            data = json.loads(text)
            return cls(data["blocks"], data["num_blocks_total"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"not a block selection JSON ({exc}); expected {{\"blocks\": [...], \"num_blocks_total\": L}}"
            ) from exc

    def to_lora_config(
        self,
        layout: BlockLayout | None = None,
        *,
        target_modules: Sequence[str] | None = None,
        layers_pattern: str | None = None,
        r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        task_type: str | None = None,
        **kwargs,
    ) -> LoraConfig:
        """A peft `LoraConfig` with LoRA on exactly these blocks (``layers_to_transform``).

        Give the model's `layout` (from `find_blocks`) or `target_modules` and `layers_pattern` directly;
        the defaults are the method's reference settings (r 8, alpha 16, dropout 0).
        """
        if layout is not None:
            if layout.num_blocks != self.num_blocks_total:
                raise ValueError(
                    f"selection is for {self.num_blocks_total} blocks but the model has {layout.num_blocks}"
                )
            target_modules = target_modules or layout.target_modules
            layers_pattern = layers_pattern or layout.pattern
        if not target_modules:
            raise ValueError("target_modules is required: pass the model's BlockLayout or name the modules")
        return LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules),
            layers_to_transform=list(self.blocks),
            layers_pattern=layers_pattern,
            task_type=task_type,
            **kwargs,
        )

    @classmethod
    def from_lora_config(cls, config: LoraConfig, num_blocks_total: int) -> BlockSelection:
        """The selection a `LoraConfig` encodes; ``layers_to_transform=None`` means every block."""
        layers = config.layers_to_transform
        if layers is None:
            return cls.all(num_blocks_total)
        return cls([layers] if isinstance(layers, int) else layers, num_blocks_total)


def lora_layers(model: nn.Module, layout: BlockLayout) -> Iterator[tuple[int, str, nn.Module]]:
    """(block index, module path inside the block, module) for every peft LoRA layer of `model`; LoRA
    outside the transformer blocks is a `LoraPlacementError`."""
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_re = re.compile(rf"^{re.escape(layout.path)}\.(\d+)\.(.+)$")
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        match = block_re.match(name)
        if match is None:
            raise LoraPlacementError(f"LoRA landed outside the transformer blocks {layout.path!r}, on {name!r}")
        yield int(match.group(1)), match.group(2), module


def lora_placement(model: nn.Module, layout: BlockLayout) -> dict[int, set[str]]:
    """Block index -> names of target modules (leaf names) that carry LoRA in a peft model."""
    placed: dict[int, set[str]] = {}
    for block, path, _ in lora_layers(model, layout):
        placed.setdefault(block, set()).add(path.rsplit(".", 1)[-1])
    return placed


def verify_lora_placement(
    model: nn.Module, layout: BlockLayout, selection: BlockSelection, target_modules: Sequence[str]
) -> None:
    """Raise `LoraPlacementError` unless LoRA sits on exactly the selected blocks and every target module.

    peft silently matches nothing (or everything) when `layers_pattern` or `target_modules` do not fit a
    model; this check turns that into an error instead of a silent empty or full adaptation.
    """
    placed = lora_placement(model, layout)
    wanted = set(selection.blocks)
    if set(placed) != wanted:
        raise LoraPlacementError(
            f"LoRA is on blocks {sorted(placed)} but the selection is {sorted(wanted)} "
            f"(layers_pattern {layout.pattern!r}, target_modules {list(target_modules)})"
        )
    for block, names in placed.items():
        if names != set(target_modules):
            raise LoraPlacementError(
                f"block {block} has LoRA on {sorted(names)} but the target modules are {sorted(target_modules)}"
            )


def attach_lora(model: nn.Module, selection: BlockSelection, lora_config: LoraConfig, layout: BlockLayout):
    """Wrap `model` with fresh LoRA (A random, B zero) on exactly `selection`, and verify where it landed."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    verify_lora_placement(peft_model, layout, selection, lora_config.target_modules)
    return peft_model
