"""The LoRA branch: ``x ↦ s·B(A(dropout(x)))``, one per (target, adapter).

A branch owns the adapter's trainable tensors and nothing of the base layer. In a
compiled model its parts are called from graph nodes (``lora_dropout``, ``lora_A``,
``lora_B``, then a multiply by ``scaling`` and an add), so graph passes can see and
rewrite them; ``forward`` is the same maths for eager use and for tests.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LoraBranch"]


class LoraBranch(nn.Module):
    """``lora_A``: in → r, ``lora_B``: r → out; the update is ``scaling · B·A``."""

    def __init__(
        self,
        lora_A: nn.Module,
        lora_B: nn.Module,
        *,
        scaling: float,
        dropout: float,
        adapter: str,
        target: str,
        r: int,
        lora_alpha: float,
        lora_bias: bool = False,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__()
        self.lora_A = lora_A
        self.lora_B = lora_B
        # no dropout module at all when p = 0: the graph then has no dropout node either
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.scaling = scaling
        self.adapter = adapter
        self.target = target
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_bias = lora_bias
        self.fan_in_fan_out = fan_in_fan_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        return self.lora_B(self.lora_A(x)) * self.scaling  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"scaling={self.scaling:g}"
        )
