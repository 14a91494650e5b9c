"""An ``nn.Parameter`` as a layer kind: LoRA on a tensor a module reads, not on a module.

transformers 5 stores a mixture-of-experts layer's experts as fused 3-D parameters
(``mlp.experts.gate_up_proj`` of shape ``(experts, 2·intermediate, hidden)``), which no
``nn.Linear`` holds; PEFT's ``target_parameters`` adds the update to the parameter where
the module reads it. A :class:`ParameterSlot` stands for one such parameter: it knows the
parameter's shape, dtype and device and which way its experts' matrices are stored, and
its forward is the identity on the value it is given. The compiler calls it on the
parameter inside the graph of the module that owns it
(:mod:`adaptc.compiler.parameters`), so the adapters' updates are emitted after it like
any layer's branch.

Shapes, as PEFT reads them: 3-D ``(experts, out, in)`` (``F.linear`` per expert), or
``(experts, in, out)`` when the experts module says ``is_transposed`` (GPT-OSS, Llama 4:
``x @ W[e]``); 2-D ``(out, in)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adaptc.layers.base import LayerKind

__all__ = ["PARAMETER_KIND", "ParameterKind", "ParameterSlot"]

PARAMETER_KIND = "nn.Parameter"


class ParameterSlot(nn.Module):
    """One targeted parameter of a module (``name`` in the module at ``owner``); the
    adapters' branches hang under it. Holds no tensor of the base model."""

    def __init__(self, owner: str, name: str, param: torch.Tensor, is_transposed: bool) -> None:
        super().__init__()
        if param.dim() not in (2, 3):
            where = f"{owner}.{name}" if owner else name
            raise ValueError(
                f"{where}: target_parameters needs a 2-D or 3-D parameter, not a "
                f"{param.dim()}-D one of shape {tuple(param.shape)}"
            )
        self.owner = owner
        self.name = name
        self.shape = tuple(int(n) for n in param.shape)
        self.dtype = param.dtype
        self.device = param.device
        self.is_transposed = is_transposed

    @property
    def num_experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def in_out(self) -> tuple[int, int]:
        """(in_features, out_features) of one expert's matrix."""
        if len(self.shape) == 2:
            return self.shape[1], self.shape[0]
        if self.is_transposed:  # (experts, in, out)
            return self.shape[1], self.shape[2]
        return self.shape[2], self.shape[1]  # (experts, out, in)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> ParameterSlot:
        """Follow the model's ``.to()``/``.half()``: the parameter moved with its module,
        so the dtype and device a new branch is built in (``add_adapter``) move too."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        self.dtype, self.device = probe.dtype, probe.device
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call,no-any-return]

    def extra_repr(self) -> str:
        return f"parameter={self.name!r}, shape={self.shape}, is_transposed={self.is_transposed}"


@dataclass(frozen=True)
class ParameterKind(LayerKind):
    """A targeted parameter (:class:`ParameterSlot`); matched only by ``target_parameters``."""

    name: str = PARAMETER_KIND
    layer_type: type[nn.Module] = ParameterSlot
    module: bool = False

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, ParameterSlot)
        return module.in_out

    def transposed(self, module: nn.Module, requested: bool) -> bool:
        return False

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        assert isinstance(module, ParameterSlot)
        return module.dtype

    def weight(self, module: nn.Module) -> torch.Tensor:
        raise TypeError(
            "a targeted parameter's value is read in its module's graph, not from its slot"
        )

    def shape_key(self, module: nn.Module) -> tuple[object, ...]:
        assert isinstance(module, ParameterSlot)
        return (module.shape, module.is_transposed, module.dtype)

    def meta_twin(self, module: nn.Module) -> nn.Module:
        twin = copy.copy(module)
        twin.__dict__["device"] = torch.device("meta")
        twin._modules = {}
        return twin
