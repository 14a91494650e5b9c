"""What the layer kinds of quantized linear layers (torchao, optimum-quanto, HQQ) share.

Each backend's layer is matched by the names of its classes (:func:`from_package`), so
adaptc imports a backend only when a model holds its layers. A kind reads the layer's
weight dequantized (float, ``(out, in)``) for a merge, and a merge gives a plain float
``nn.Linear`` holding ``W_deq + s·ΔW``: the merged weight is not requantized (that would
round the update away again), and the user's quantized layer is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptc.layers.base import LayerKind

__all__ = ["QuantizedLinearKind", "float_linear", "from_package"]


def from_package(obj: Any, package: str, *names: str) -> bool:
    """Whether ``obj``'s type, or one of its bases, is a class of ``package`` (a module path
    prefix) named one of ``names`` (any name when none are given), without importing it."""
    return any(
        (cls.__module__ == package or cls.__module__.startswith(package + "."))
        and (not names or cls.__name__ in names)
        for cls in type(obj).__mro__
    )


def float_linear(
    module: nn.Module, features: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None
) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (``(out, in)``) and ``bias`` (``module``'s own
    bias when None), as new frozen parameters in ``weight``'s dtype."""
    own = getattr(module, "bias", None)
    value = own if bias is None else bias
    fan_in, fan_out = features
    merged = nn.Linear(
        fan_in, fan_out, bias=value is not None, device=weight.device, dtype=weight.dtype
    )
    merged.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if value is not None:
        merged.bias = nn.Parameter(value.detach().to(weight.dtype), requires_grad=False)
    return merged


@dataclass(frozen=True)
class QuantizedLinearKind(LayerKind):
    """A quantized linear layer: ``in_features``/``out_features`` attributes, a weight that
    :meth:`weight` dequantizes, and a float ``nn.Linear`` as its merged form."""

    layer_type: type[nn.Module] = nn.Module  # matched by name (see ``matches``)
    linear: bool = True
    quantized: bool = True

    def features(self, module: nn.Module) -> tuple[int, int]:
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]

    def meta_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        """A plain meta tensor of ``param``'s (logical) shape and dtype: quantized tensor
        subclasses need not implement ``empty_like``."""
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        return nn.Parameter(meta, requires_grad=param.requires_grad)

    def with_weights(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        """A plain float ``nn.Linear`` holding the (dequantized, merged) weights."""
        return float_linear(module, self.features(module), weight, bias)
