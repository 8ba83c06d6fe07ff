"""Flexora's per-block gates: one scalar alpha per transformer block, scaling that block's LoRA branches.

The gate of block l is ``g[l] = L * softmax(alpha)[l]``: 1 everywhere at alpha = 0 (plain LoRA), summing
to L always. It multiplies the output of every ``lora_B`` of block l once, so each adapted module computes
``W x + g[l] * scaling * B A x``: linear in the gate (the reference code gates every LoRA sub-module and so
applies it three times).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .blocks import BlockLayout, LoraPlacementError, lora_layers


class BlockGates(nn.Module):
    """The gate logits `alpha` (one per block, initialised to 0) and the hooks that apply them.

    Gradients reach `alpha` only while ``alpha.requires_grad`` is True (the gate step); otherwise the gates
    are constants, computed once per alpha update instead of once per adapted module.
    """

    def __init__(
        self, num_blocks: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.alpha = nn.Parameter(torch.zeros(num_blocks, device=device, dtype=dtype))
        self._handles: list[RemovableHandle] = []
        self._cached: tuple[int, torch.Tensor] | None = None
        self.placement: dict[int, list[str]] = {}

    def values(self) -> torch.Tensor:
        """The gates ``L * softmax(alpha)``; part of the autograd graph only while alpha requires grad."""
        if self.alpha.requires_grad:
            return self.num_blocks * torch.softmax(self.alpha, dim=0)
        version = self.alpha._version
        if self._cached is None or self._cached[0] != version:
            with torch.no_grad():
                self._cached = (version, self.num_blocks * torch.softmax(self.alpha, dim=0))
        return self._cached[1]

    def _hook(self, block: int):
        def scale(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * self.values()[block].to(output.dtype)

        return scale

    def attach(self, model: nn.Module, layout: BlockLayout) -> dict[int, list[str]]:
        """Hook every LoRA ``lora_B`` inside the blocks of a peft `model`; returns block -> gated modules."""
        if layout.num_blocks != self.num_blocks:
            raise ValueError(f"{self.num_blocks} gates for a model with {layout.num_blocks} blocks")
        self.remove()
        placement: dict[int, list[str]] = {}
        for block, path, module in lora_layers(model, layout):
            for adapter, lora_b in module.lora_B.items():
                self._handles.append(lora_b.register_forward_hook(self._hook(block)))
                placement.setdefault(block, []).append(f"{path}[{adapter}]")
        if not placement:
            raise LoraPlacementError("the model carries no LoRA layers inside its blocks; nothing to gate")
        self.placement = placement
        return placement

    def remove(self) -> None:
        """Detach the hooks: the model becomes plain LoRA again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.placement = {}
