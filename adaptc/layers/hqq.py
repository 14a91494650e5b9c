"""HQQ's ``HQQLinear`` (``hqq.HQQLinear``; PEFT's ``HqqLoraLinear``).

``HQQLinear`` is an ``nn.Module``, not an ``nn.Linear``: its one parameter ``W_q`` holds
the packed 2/3/4/8-bit codes (uint8, e.g. two 4-bit codes a byte), and a ``meta`` dict
(an attribute) the per-group ``scale`` and ``zero`` and the float ``shape``:
``W ≈ (W_q - zero) · scale`` per group of ``group_size``, dequantized in the layer's
``compute_dtype`` on every forward. The output is in ``compute_dtype``.

The compiled model's copy shares ``W_q`` (a new Parameter over its storage) and the tensors
in ``meta``, in a ``meta`` dict of its own: ``dequantize()`` adds and removes entries of
that dict while it runs. For a merge the weight is dequantized (on a copy of ``meta``, the
user's layer is not written) and the merged layer is a plain float ``nn.Linear``; PEFT
requantizes into a new ``HQQLinear`` instead. PEFT's ``all-linear`` selects
``nn.Linear``/``Conv1D`` only, so this kind is not ``linear``: ``all-linear`` skips it, as
PEFT does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptc.layers.quantized import QuantizedLinearKind, float_linear, from_package

__all__ = ["HqqKind"]


@dataclass(frozen=True)
class HqqKind(QuantizedLinearKind):
    name: str = "hqq.HQQLinear"
    linear: bool = False  # PEFT's all-linear does not select it

    def matches(self, module: nn.Module) -> bool:
        return from_package(module, "hqq", "HQQLinear")

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype  # type: ignore[return-value]

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight: (out, in), ``compute_dtype``."""
        w_q: Any = module.W_q
        if w_q.device.type == "meta":  # planning: shapes only
            fan_in, fan_out = self.features(module)
            return torch.empty(fan_out, fan_in, dtype=self.compute_dtype(module), device="meta")
        reader: Any = copy.copy(module)  # dequantize() writes into meta: give it its own
        reader.__dict__["meta"] = dict(module.meta)  # type: ignore[arg-type]
        out: torch.Tensor = reader.dequantize()
        return out.reshape(self.features(module)[::-1])

    def share_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        if isinstance(state.get("meta"), dict):
            state["meta"] = dict(state["meta"])  # the same tensors, its own entries

    def requantize(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[nn.Module, float]:
        """A new ``HQQLinear`` holding ``weight`` quantized with the layer's quantization
        config and compute dtype, as PEFT's ``HqqLoraLinear`` merge builds it."""
        from hqq.core.quantize import HQQLinear

        layer: Any = module
        linear = float_linear(module, self.features(module), weight, bias)
        config = {**copy.deepcopy(layer.quant_config), "offload_meta": layer.offload_meta}
        new: Any = HQQLinear(
            linear, quant_config=config, compute_dtype=layer.compute_dtype,
            device=str(weight.device),
        )  # fmt: skip
        new.requires_grad_(False)
        return new, float((self.weight(new) - weight.to(layer.compute_dtype)).abs().max())
