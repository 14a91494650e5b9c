"""``modules_to_save``: modules trained in full, as trainable copies beside a frozen original."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """The frozen ``original_module`` plus one trainable copy per adapter in ``modules_to_save``.

    The layout (and so the parameter count and state-dict keys) is PEFT's
    ``ModulesToSaveWrapper``. The copies own new storage: training them never writes into
    the user's model. Attributes the model reads (``weight``, ``out_features``) come from
    the active copy.
    """

    def __init__(self, original: nn.Module, adapters: Sequence[str]) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict({a: trainable_copy(original) for a in adapters})
        self.active_adapter: str | None = adapters[0] if adapters else None

    # set (in the instance's __dict__) while an operation routes the calls, e.g. a mixed
    # batch (adaptc.adapters.mixed): route(wrapper, args, kwargs) -> output, or
    # NotImplemented to run the active copy
    route: Callable[[ModulesToSave, tuple[Any, ...], dict[str, Any]], Any] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = self.__dict__.get("route")
        if route is not None:
            out = route(self, args, kwargs)
            if out is not NotImplemented:
                return out
        return self.active_module(*args, **kwargs)

    @property
    def active_module(self) -> nn.Module:
        if self.active_adapter is None or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "modules_to_save" not in modules:
                raise
            return getattr(self.active_module, name)


def trainable_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)  # new storage for every tensor
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


_ = torch
