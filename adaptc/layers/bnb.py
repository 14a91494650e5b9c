"""bitsandbytes' ``Linear8bitLt`` (8-bit weights, PEFT's ``lora.bnb.Linear8bitLt``).

Matched by class name and module, so adaptc never imports bitsandbytes unless a model
holds its layers. The compiled model's copy shares the int8 weight (a new ``Int8Params``
over the same storage, its ``CB``/``SCB`` kept) and gets its own matmul ``state``: the
layer's forward moves ``CB``/``SCB`` into it, which must not touch the user's layer. For a
merge the weight is dequantized (``CB · SCB / 127``, float32) and the merged layer is a
plain float ``nn.Linear``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptc.layers.base import LayerKind, share_parameter

__all__ = ["Bnb8bitKind", "is_bnb"]


def is_bnb(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is bitsandbytes' layer class ``name`` (without importing it)."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("bitsandbytes")


@dataclass(frozen=True)
class Bnb8bitKind(LayerKind):
    name: str = "bnb.Linear8bitLt"
    layer_type: type[nn.Module] = nn.Linear  # a subclass of nn.Linear; matched by name
    linear: bool = True

    def matches(self, module: nn.Module) -> bool:
        return is_bnb(module, "Linear8bitLt")

    def features(self, module: nn.Module) -> tuple[int, int]:
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the layer reads for a merge; its output follows its input's dtype."""
        return torch.float32

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight (float32), as PEFT's ``dequantize_bnb_weight``."""
        import bitsandbytes as bnb

        weight: Any = module.weight
        state: Any = getattr(module, "state", None)
        scb = getattr(state, "SCB", None)
        if scb is None:
            scb = getattr(weight, "SCB", None)
        if weight.device.type == "meta" or scb is None:  # planning: shapes only
            return torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        scale = scb.to(weight.device)
        out: torch.Tensor = bnb.functional.int8_vectorwise_dequant(weight.data, scale)
        return out

    def share_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        if name != "weight" or type(param).__name__ != "Int8Params":
            return share_parameter(param)
        cls: Any = type(param)
        return cls(  # type: ignore[no-any-return]
            param.data, requires_grad=False, has_fp16_weights=param.has_fp16_weights,  # type: ignore[attr-defined]
            CB=param.CB, SCB=param.SCB,  # type: ignore[attr-defined]
        )  # fmt: skip

    def share_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        if "state" in state:
            state["state"] = copy.copy(state["state"])  # the same tensors, its own fields

    def with_weights(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        """A plain float ``nn.Linear`` holding the (dequantized, merged) weights."""
        own_bias = getattr(module, "bias", None)
        merged = nn.Linear(
            self.features(module)[0], self.features(module)[1], bias=own_bias is not None,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        merged.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if own_bias is not None:
            value = own_bias if bias is None else bias
            merged.bias = nn.Parameter(value.detach().to(weight.dtype), requires_grad=False)
        return merged
