"""The LoRA branch: ``x ↦ s·B(A(dropout(x)))``, one per (target, adapter).

A branch owns the adapter's trainable tensors and nothing of the base layer. In a
compiled model its parts are called from graph nodes (``lora_dropout``, ``lora_A``,
``lora_B``, then a multiply by ``scaling`` and an add), so graph passes can see and
rewrite them; ``forward`` is the same maths for eager use and for tests.

``scaling`` is a Python float, baked into the graph as a constant. A branch prepared for
hotswapping (``adaptc.prepare_hotswap``) also holds it as a 0-d, non-persistent buffer
:data:`SCALING_BUFFER`, which the graph reads instead (so a new value needs no new code),
and may hold factors padded with zeros beyond its true rank ``r``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.base import Branch

__all__ = ["RANK_DIMS", "SCALING_BUFFER", "FrozenFactor", "LoraBranch"]

SCALING_BUFFER = "scaling_tensor"
# factor parameter -> the dimension that has the rank (padded factors are longer there)
RANK_DIMS = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


class FrozenFactor(nn.Parameter):
    """A factor that never trains (MiCA's ``B``; PEFT's ``frozen_peft_weight_names``).

    It is a parameter (counted, saved and loaded like the other factors) whose
    ``requires_grad`` stays False: ``requires_grad_`` leaves it frozen, so what makes an
    adapter trainable (``module.requires_grad_(True)``, activating the adapter, loading it
    trainable) keeps it as PEFT keeps it (PEFT freezes it again after each of those). Set
    ``requires_grad = True`` on it to train it anyway.
    """

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> FrozenFactor:
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenFactor:
        return self


class LoraBranch(Branch):
    """``lora_A``: in → r, ``lora_B``: r → out; the update is ``scaling · B·A``.

    ``variant`` is the name of the variant that built the branch (``"dora"``), or None."""

    method: ClassVar[str] = "lora"
    variant: str | None = None

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
        return self.lora_B(self.lora_A(x)) * self.scaling_operand  # type: ignore[no-any-return]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: (r, in, …) and (out, r, …) (an embedding's: (r, num), (dim, r))."""
        A, B = self.lora_A.weight, self.lora_B.weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        return A, B

    @property
    def scaling_operand(self) -> torch.Tensor | float:
        """What the forward multiplies by: the scaling buffer when prepared, else ``scaling``."""
        tensor = self._buffers.get(SCALING_BUFFER)
        return self.scaling if tensor is None else tensor

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for what an adapter file holds: the parameters, each factor cut
        to the true rank ``r`` (a view) when it is padded; nothing when ``r`` is 0 (a layer
        the hotswapped adapter does not target)."""
        if self.r == 0:
            return
        for name, param in self.named_parameters():
            dim = RANK_DIMS.get(name)
            # (a ZeRO-3 partitioned parameter is empty here: it is never padded)
            if dim is not None and param.dim() > dim and param.shape[dim] > self.r:
                yield name, param.narrow(dim, 0, self.r)
            else:
                yield name, param

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"scaling={self.scaling:g}"
        )
