"""An ``nn.Linear`` whose weight is a torchao tensor subclass (``torchao.Linear``).

``torchao.quantization.quantize_`` (or transformers' ``TorchAoConfig``) keeps the layer an
``nn.Linear`` and replaces its weight by a tensor subclass: ``Int8Tensor``
(``Int8WeightOnlyConfig``: ``W ≈ qdata · scale``, one scale per row),
``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``, e.g. int4 in groups of 32:
``W ≈ (qdata - zero_point) · scale`` per group), or an ``NF4Tensor`` put there by hand
(``to_nf4``, QLoRA's 4-bit NormalFloat). The subclass reports the float weight's shape and
dtype; its forward dequantizes (or runs an int kernel) inside ``F.linear``.

The compiled model's weight is a new Parameter over a ``detach()`` of the subclass: the
same inner tensors (``qdata``, ``scale``, …), nothing dequantized is kept. For a merge the
weight is dequantized (``dequantize()``, ``get_original_weight()`` for NF4) and the merged
layer is a plain float ``nn.Linear``; PEFT's ``TorchaoLoraLinear`` requantizes instead, as
a requantizing merge does (the format read off the weight's subclass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptc.layers.base import LayerKind
from adaptc.layers.quantized import QuantizedLinearKind, float_linear, from_package

__all__ = ["TorchaoKind", "is_nf4"]


def is_nf4(weight: Any) -> bool:
    """Whether ``weight`` is torchao's ``NF4Tensor`` (PEFT gives it its plain ``lora.Linear``;
    the other torchao subclasses get ``TorchaoLoraLinear``)."""
    return from_package(weight, "torchao", "NF4Tensor")


@dataclass(frozen=True)
class TorchaoKind(QuantizedLinearKind):
    name: str = "torchao.Linear"
    layer_type: type[nn.Module] = nn.Linear  # an nn.Linear; matched by its weight's type

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and from_package(module.weight, "torchao")

    def meta_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        """An ``NF4Tensor`` on the meta device for an NF4 weight (it has ``empty_like``, and
        LoRA's rule tells NF4 from the others), else a plain meta tensor."""
        if is_nf4(param):
            return LayerKind.meta_parameter(self, module, name, param)
        return super().meta_parameter(module, name, param)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight, (out, in), in the dtype the subclass reports."""
        weight: Any = module.weight
        if weight.device.type == "meta" or not from_package(weight, "torchao"):
            return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        out: torch.Tensor = weight.get_original_weight() if is_nf4(weight) else weight.dequantize()
        return out

    def requantize(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[nn.Module, float]:
        """A float ``nn.Linear`` holding ``weight``, quantized again as its weight was: an
        ``NF4Tensor`` with the same block sizes; ``Int8Tensor`` and
        ``IntxUnpackedToInt8Tensor`` weight-only (no activation quantization) with the
        same dtype and block size, through ``quantize_``. Other subclasses are refused."""
        new = float_linear(module, self.features(module), weight, bias)
        new.weight = nn.Parameter(_quantized_like(module.weight, new.weight), requires_grad=False)
        return new, float((self.weight(new) - weight).abs().max())


def _quantized_like(old: Any, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (float) quantized in the format of torchao's tensor ``old``."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    if is_nf4(old):
        from torchao.quantization import to_nf4  # (0.18 moved it here)

        out: torch.Tensor = to_nf4(weight, old.block_size, old.scaler_block_size)
        return out
    name = type(old).__name__
    _, meta = old.__tensor_flatten__()
    config: Any = None
    if name == "Int8Tensor" and meta.get("act_quant_kwargs") is None:
        config = Int8WeightOnlyConfig()
    elif name == "IntxUnpackedToInt8Tensor" and meta.get("activation_quantization") is None:
        group = PerGroup(int(meta["block_size"][-1]))
        config = IntxWeightOnlyConfig(weight_dtype=meta["target_dtype"], granularity=group)
    if config is None:
        raise ValueError(
            f"merged torchao.Linear layers holding a {name} cannot be requantized yet; merge "
            "with quantized='dequantize'"
        )
    holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    holder[0].weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    quantize_(holder, config)
    quantized: torch.Tensor = holder[0].weight.detach()
    return quantized
