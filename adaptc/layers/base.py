"""Layer kinds: what adaptc knows about one kind of layer, whatever adapter it carries.

A kind owns matching (first registered match wins: specific kinds before general
ones), the shapes PEFT speaks of (``in_features``/``out_features``), the weight's layout
(stored (out, in) or, as transformers' ``Conv1D``, (in, out)), the dtype it computes in,
how its frozen parameters are shared with the user's model, and how its weight is read
for a merge and written back (a quantized kind dequantizes and requantizes there). Kinds
are pure: they never change the module they are given (it is shared with the user's
model). Adapter methods (:mod:`adaptc.methods`) work on layers only through their kind.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerKind",
    "UnsupportedLayerError",
    "dequantized_weight",
    "find_kind",
    "kind_names",
    "kind_of",
    "kinds",
    "register",
    "share_parameter",
]


class UnsupportedLayerError(ValueError):
    """A module's type has no layer kind."""


def share_parameter(param: nn.Parameter, *, requires_grad: bool = False) -> nn.Parameter:
    """A new Parameter object over ``param``'s storage."""
    return nn.Parameter(param.detach(), requires_grad=requires_grad)


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer. ``name`` is the spec's type name (``targets: {kind: types}``)."""

    name: str
    layer_type: type[nn.Module]
    linear: bool = False  # a linear layer: selected by `all-linear` (PEFT's rule)
    quantized: bool = False  # its weight is quantized: a merge dequantizes or requantizes
    module: bool = True  # a module kind (selected by targets); False: a targeted parameter

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_type)

    def features(self, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) as PEFT defines them for this layer."""
        weight = self.weight(module)
        return int(weight.shape[1]), int(weight.shape[0])

    def transposed(self, module: nn.Module, requested: bool) -> bool:
        """Whether the weight is stored (in, out) (PEFT's ``fan_in_fan_out``); kinds whose
        layout is fixed ignore ``requested``."""
        return requested

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of the layer's output for a floating-point input of that dtype."""
        return self.weight(module).dtype

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as a plain tensor in the layer's own layout (for merging)."""
        weight = module.weight
        assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight"
        return weight

    def share_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        """The compiled model's frozen parameter for the user's ``param`` (same storage;
        a kind whose parameters carry state, such as a quantized one, keeps it)."""
        return share_parameter(param)

    def meta_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        """A stand-in for ``param`` on the meta device (planning builds a branch on a meta
        twin of the layer to count its parameters); a kind whose tensor subclass has no
        ``empty_like`` gives a plain tensor its :meth:`weight` reads."""
        return nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)

    def shape_key(self, module: nn.Module) -> tuple[object, ...]:
        """What decides the size of a branch on ``module`` besides the settings (planning
        counts one branch per key): its parameters' names and shapes."""
        return tuple((k, tuple(p.shape)) for k, p in module.named_parameters(recurse=False))

    def meta_twin(self, module: nn.Module) -> nn.Module:
        """A shallow copy of the leaf ``module`` whose tensors live on the meta device
        (planning builds a branch on it to count its parameters)."""
        twin = copy.copy(module)
        twin._parameters = {
            k: None if p is None else self.meta_parameter(module, k, p)
            for k, p in module._parameters.items()
        }
        twin._buffers = {
            k: None if b is None else torch.empty_like(b, device="meta")
            for k, b in module._buffers.items()
        }
        twin._modules = {}
        return twin

    def share_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        """Give the compiled model's copy of ``module`` (its ``__dict__``, ``state``) its own
        mutable state where the layer keeps some besides its tensors (a quantized layer's
        matmul state, changed by its forward); the tensors in it stay shared."""

    def with_weights(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        """A shallow copy of ``module`` whose weight is ``weight`` (and bias ``bias`` when
        given), as new frozen parameters; its children and hook dicts are its own."""
        new = copy.copy(module)  # shallow: a new __dict__, same tensors until replaced below
        new._modules = dict(module._modules)
        new._parameters = dict(module._parameters)
        new._parameters["weight"] = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None and "bias" in new._parameters:
            own = module._parameters["bias"]
            new._parameters["bias"] = (
                own if bias is own else nn.Parameter(bias.detach(), requires_grad=False)
            )
        for hooks in ("_forward_hooks", "_forward_pre_hooks"):
            if hooks in new.__dict__:
                new.__dict__[hooks] = copy.copy(new.__dict__[hooks])
        return new

    def requantize(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[nn.Module, float]:
        """The merged layer quantized again in ``module``'s format, and the largest absolute
        error of its dequantized weight against ``weight`` (requantizing is lossy). A float
        kind writes ``weight`` as it is (error 0)."""
        if self.quantized:
            raise ValueError(
                f"merged {self.name} layers cannot be requantized yet; merge with "
                "quantized='dequantize' (a float layer holding W_deq + s·ΔW)"
            )
        return self.with_weights(module, weight, bias), 0.0


_KINDS: list[LayerKind] = []


def register(kind: LayerKind) -> LayerKind:
    """Add a kind; more specific kinds must be registered before general ones."""
    _KINDS.append(kind)
    return kind


def kinds() -> tuple[LayerKind, ...]:
    return tuple(_KINDS)


def kind_names() -> tuple[str, ...]:
    """The names of the module kinds (what ``targets: {kind: types}`` can name)."""
    return tuple(kind.name for kind in _KINDS if kind.module)


def find_kind(module: nn.Module) -> LayerKind | None:
    """The first kind that matches ``module``, or None."""
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as its kind reads it (dequantized, for a quantized kind): the
    function a graph calls where a variant needs a quantized layer's weight at run time."""
    return kind_of(module).weight(module)


def kind_of(module: nn.Module, path: str = "") -> LayerKind:
    """The kind of ``module``; an :class:`UnsupportedLayerError` listing the kinds if none."""
    kind = find_kind(module)
    if kind is None:
        where = f"{path}: " if path else ""
        raise UnsupportedLayerError(
            f"{where}layer type {type(module).__name__} is not supported "
            f"(supported: {', '.join(kind_names())})"
        )
    return kind
