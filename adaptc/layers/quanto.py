"""optimum-quanto's ``QLinear`` (``quanto.QLinear``; PEFT gives it its plain ``lora.Linear``).

``optimum.quanto.quantize(model, weights=qint8)`` swaps each ``nn.Linear`` for a
``QLinear`` (a subclass) whose ``weight`` is still float until ``freeze(model)`` replaces
it by a quantized tensor: ``WeightQBytesTensor`` (qint8, ``W ≈ data · scale``, one scale
per row) or ``WeightQBitsTensor`` (qint4/qint2, ``W ≈ (data - shift) · scale`` per group).
Before ``freeze`` the layer quantizes its float weight on every forward (its ``qweight``).

The compiled model's weight is a new Parameter over a ``detach()`` of the quantized
tensor: the same inner tensors (``_data``, ``_scale``, ``_shift``). For a merge the weight
the layer computes with (``qweight``) is dequantized, and the merged layer is a plain
float ``nn.Linear``: a ``QLinear`` holding the merged float weight would quantize it again
on each forward, rounding the update away. A requantizing merge gives a frozen ``QLinear``
of the same weight type instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptc.layers.quantized import QuantizedLinearKind, float_linear, from_package

__all__ = ["QuantoKind"]


@dataclass(frozen=True)
class QuantoKind(QuantizedLinearKind):
    name: str = "quanto.QLinear"
    layer_type: type[nn.Module] = nn.Linear  # a subclass of nn.Linear; matched by name

    def matches(self, module: nn.Module) -> bool:
        return from_package(module, "optimum.quanto", "QLinear")

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer computes with, dequantized: (out, in), the float dtype the
        quantized tensor reports (the model's dtype when it was quantized)."""
        weight: Any = module.weight
        if weight.device.type == "meta":  # planning: shapes only
            return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        qweight: Any = getattr(module, "qweight", None)  # None: activations-only quantization
        if qweight is None:
            return weight  # type: ignore[no-any-return]
        out: torch.Tensor = qweight.dequantize() if hasattr(qweight, "dequantize") else qweight
        return out.detach()

    def requantize(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[nn.Module, float]:
        """A frozen ``QLinear`` holding ``weight`` quantized with the layer's weight type,
        activation type and optimizer (what ``quantize`` + ``freeze`` give)."""
        from optimum.quanto import QLinear

        layer: Any = module
        linear = float_linear(module, self.features(module), weight, bias)
        new: Any = QLinear.from_module(
            linear, weights=layer.weight_qtype, activations=layer.activation_qtype,
            optimizer=layer.optimizer,
        )  # fmt: skip
        new.freeze()
        new.requires_grad_(False)
        return new, float((self.weight(new) - weight).abs().max())
