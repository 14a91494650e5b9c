"""A structural copy of a model that shares its weights.

Every module is copied (same class, new ``_modules``/``_parameters``/``_buffers`` and
hook dicts), every parameter becomes a new frozen ``nn.Parameter`` over the *same*
storage, and shared modules and tied parameters stay shared. The copy can then be
rewritten freely: the user's model is never touched, and no weight memory is duplicated.
Running statistics of batch-norm-like layers are cloned, since training updates them in
place; model configs are deep-copied so the copy can change them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch.utils.hooks import RemovableHandle

from adaptc.layers import find_kind, share_parameter

__all__ = ["share_clone"]

_HOOK_CONTAINERS = (dict, set)


def share_clone(model: nn.Module) -> nn.Module:
    """Copy the module tree of ``model``; weights are shared and frozen."""
    cloner = _Cloner()
    new = cloner.clone(model)
    cloner.remap_handles()
    return new


class _Cloner:
    def __init__(self) -> None:
        self.modules: dict[int, nn.Module] = {}
        self.params: dict[int, nn.Parameter] = {}
        self.configs: dict[int, Any] = {}
        self.hook_dicts: dict[int, Any] = {}  # id(original hooks dict) -> its copy
        self.handles: list[tuple[dict[str, Any], str]] = []  # (new __dict__, key) to remap
        self.new_handles: dict[int, RemovableHandle] = {}

    def clone(self, module: nn.Module) -> nn.Module:
        if id(module) in self.modules:
            return self.modules[id(module)]
        new: nn.Module
        if isinstance(module, fx.GraphModule):
            # its class carries the generated forward; GraphModule.__new__ would make a
            # fresh subclass without it (a merged model's graphs, compiled again)
            new = object.__new__(module.__class__)
        else:
            new = module.__class__.__new__(module.__class__)
        self.modules[id(module)] = new
        state = module.__dict__.copy()
        for key, value in state.items():
            if key.startswith("_") and isinstance(value, _HOOK_CONTAINERS):
                state[key] = value.copy()  # hooks, buffer sets: ours from now on
                self.hook_dicts[id(value)] = state[key]
            elif _is_config(value):
                state[key] = self.config(value)
            elif _holds_handles(value):  # e.g. transformers' _require_grads_hooks
                self.handles.append((new.__dict__, key))
        state["_parameters"] = {
            name: None if p is None else self.param(module, name, p)
            for name, p in module._parameters.items()
        }
        state["_buffers"] = {
            name: _own_buffer(module, name, b) for name, b in module._buffers.items()
        }
        state["_modules"] = {
            name: None if child is None else self.clone(child)
            for name, child in module._modules.items()
        }
        kind = find_kind(module)
        if kind is not None:
            kind.share_state(module, state)
        new.__dict__.update(state)
        return new

    def remap_handles(self) -> None:
        """Hook handles kept in attributes must remove the copy's hooks, not the original's."""
        for state, key in self.handles:
            value = state[key]
            if isinstance(value, RemovableHandle):
                state[key] = self._handle(value)
            else:
                state[key] = type(value)(self._handle(h) for h in value)

    def _handle(self, handle: RemovableHandle) -> RemovableHandle:
        if id(handle) in self.new_handles:  # one handle may be kept under two names
            return self.new_handles[id(handle)]
        target = self.hook_dicts.get(id(handle.hooks_dict_ref()))
        if target is None:
            return handle
        extra = [self.hook_dicts.get(id(ref()), ref()) for ref in handle.extra_dict_ref]
        new = RemovableHandle(target, extra_dict=[d for d in extra if d is not None])
        new.id = handle.id
        self.new_handles[id(handle)] = new
        return new

    def param(self, module: nn.Module, name: str, p: nn.Parameter) -> nn.Parameter:
        """The copy's frozen parameter: shared as the module's layer kind shares it (a
        quantized kind keeps its subclass and state), plainly for any other module."""
        if id(p) not in self.params:
            kind = find_kind(module)
            shared = share_parameter(p) if kind is None else kind.share_parameter(module, name, p)
            self.params[id(p)] = shared
        return self.params[id(p)]

    def config(self, value: Any) -> Any:
        if id(value) not in self.configs:
            self.configs[id(value)] = copy.deepcopy(value)
        return self.configs[id(value)]


def _own_buffer(module: nn.Module, name: str, buf: torch.Tensor | None) -> torch.Tensor | None:
    if buf is None:
        return None
    running = isinstance(module, nn.modules.batchnorm._NormBase) and name in (
        "running_mean",
        "running_var",
        "num_batches_tracked",
    )
    return buf.clone() if running else buf


def _holds_handles(value: Any) -> bool:
    if isinstance(value, RemovableHandle):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, RemovableHandle) for v in value)


def _is_config(value: Any) -> bool:
    cls = type(value)
    return cls.__module__.startswith("transformers") and cls.__name__.endswith(
        ("Config", "GenerationConfig")
    )
