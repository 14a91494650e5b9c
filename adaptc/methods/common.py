"""What several methods share, below the method packages (which never import each other):
the adapter dtype PEFT picks, the layer-input rewrites of a graph, and LoRA's default
targets read through the registry (PEFT copies LoRA's table for LoHa, LoKr, VeRA, OFT and
BOFT)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import fx

from adaptc.methods.registry import method

__all__ = ["LoraDefaultTargets", "adapter_dtype", "layer_input", "set_layer_input"]


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The adapter's dtype: the base weight's, float32 for a half-precision (or smaller, or
    non-float) base, as PEFT's ``autocast_adapter_dtype``."""
    dtype = weight.dtype
    if not dtype.is_floating_point or dtype.itemsize < 4:
        return torch.float32
    return dtype


def layer_input(call: fx.Node) -> fx.Node:
    """The input the layer ``call`` reads as it is now (its first argument, or its only
    keyword argument; an earlier adapter may have replaced it already)."""
    inp = call.args[0] if call.args else next(iter(call.kwargs.values()))
    assert isinstance(inp, fx.Node), f"{call.target}: the layer's input is not a node"
    return inp


def set_layer_input(call: fx.Node, node: fx.Node) -> None:
    """Make the layer ``call`` read ``node`` instead of its input."""
    if call.args:
        call.args = (node, *call.args[1:])
    else:
        call.kwargs = {**call.kwargs, next(iter(call.kwargs)): node}


class LoraDefaultTargets(Mapping[str, "tuple[str, ...] | str"]):
    """LoRA's default targets by ``config.model_type`` (read from the registry when used),
    with a method's own entries over them (``own``)."""

    def __init__(self, own: Mapping[str, tuple[str, ...] | str] | None = None) -> None:
        self._own = dict(own or {})

    def _table(self) -> dict[str, tuple[str, ...] | str]:
        return {**method("lora").default_targets, **self._own}

    def __getitem__(self, key: str) -> tuple[str, ...] | str:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())
