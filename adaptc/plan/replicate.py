"""Layer replication (PEFT's ``layer_replication``): a transformer's stack of layers rebuilt
from ranges of its layers, every copy sharing the weights of the layer it copies.

PEFT's ``replicate_layers`` finds the stack as ``model[.model]*.layers`` (Llama-like),
``[.bert].encoder.layer`` (BERT-like) or ``.h`` (Falcon-like), and rewrites the model in
place. :func:`replicated` builds the same structure *beside* the model: every module is a
new object (same class, new ``_modules``/``_parameters``/``_buffers`` dicts, the original's
parameter and buffer objects), the stack is a new ``nn.ModuleList`` of distinct copies, and
the configs are copies, so nothing of the caller's model changes and no tensor is
allocated (it works on the meta device). The planner resolves targets on it, and the
compiler shares it like any model (copies of one layer then share their frozen weights).

Example, on a 4-layer Llama with ``[(0, 2), (1, 4)]``::

    model.layers: [L0, L1, L2, L3]   ──►   model.layers: [L0, L1, L1′, L2, L3]
    config.num_hidden_layers: 4            config.num_hidden_layers: 5

Like PEFT, each copy's modules that have a ``layer_idx`` get their new position (the KV
cache keeps one entry per position) and the config's ``num_hidden_layers`` is the new
count; unlike PEFT, a config's per-layer ``layer_types`` is replicated too (PEFT leaves it
at the old length, which breaks Qwen2-like models' forward).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from adaptc.layers import find_kind, share_parameter
from adaptc.methods.registry import branches_of

__all__ = [
    "LayerStack",
    "find_layer_stack",
    "ranges_text",
    "replicated",
    "separate_copies",
    "spec_replication",
]

Ranges = tuple[tuple[int, int], ...]

# PEFT's error when the stack cannot be found (replicate_layers).
NOT_FOUND = (
    "layer_replication: Could not locate the layers attribute in the model. "
    "Expected Llama, Bert or Falcon compatible architectures."
)


@dataclass(frozen=True)
class LayerStack:
    """Where a model's layers are: ``owner.<attr>`` is the ``nn.ModuleList`` (``path`` from
    the root, e.g. ``model.layers``); ``inner`` is the module whose config counts them."""

    inner: nn.Module
    owner: nn.Module
    attr: str
    path: str

    @property
    def layers(self) -> nn.ModuleList:
        value = getattr(self.owner, self.attr)
        assert isinstance(value, nn.ModuleList)
        return value


def spec_replication(spec: Any) -> Ranges | None:
    """The spec's ``layer_replication`` (its adapters all give the same one), or None."""
    for adapter in spec.adapters.values():
        ranges: Ranges | None = getattr(adapter, "layer_replication", None)
        return ranges
    return None


def ranges_text(ranges: Ranges | None) -> str:
    """``[[0, 2], [1, 4]]`` (as a user writes them), or ``none``."""
    return "none" if ranges is None else str([list(pair) for pair in ranges])


def find_layer_stack(model: nn.Module) -> LayerStack:
    """The layer stack as PEFT's ``replicate_layers`` finds it; ``ValueError`` (PEFT's
    message) when the model has none."""
    inner: Any = model
    parts: list[str] = []
    seen = {id(inner)}
    while hasattr(inner, "model"):
        inner = inner.model
        parts.append("model")
        if id(inner) in seen:  # a cycle: PEFT would loop forever
            raise ValueError(NOT_FOUND)
        seen.add(id(inner))
    if hasattr(inner, "bert"):  # some BERT variants nest the encoder under `bert`
        inner = inner.bert
        parts.append("bert")
    owner, attr = inner, None
    if hasattr(inner, "layers"):  # Llama-like
        attr = "layers"
    elif hasattr(inner, "encoder") and hasattr(inner.encoder, "layer"):  # BERT-like
        owner, attr = inner.encoder, "layer"
        parts.append("encoder")
    elif hasattr(inner, "h"):  # Falcon-like
        attr = "h"
    if attr is None or not isinstance(inner, nn.Module) or not isinstance(owner, nn.Module):
        raise ValueError(NOT_FOUND)
    if not isinstance(getattr(owner, attr), nn.ModuleList):
        raise ValueError(NOT_FOUND)
    return LayerStack(inner, owner, attr, ".".join([*parts, attr]))


def replicated(model: nn.Module, ranges: Sequence[tuple[int, int]]) -> nn.Module:
    """A new structure of ``model`` whose layer stack is the ``ranges`` (``[start, end)``
    pairs) of its layers, in order; ``model`` is left as it was (see the module docstring).
    A one-line ``ValueError`` when the model has no stack or a range goes past it."""
    stack = find_layer_stack(model)
    layers = stack.layers
    for start, end in ranges:
        if end > len(layers):
            raise ValueError(
                f"layer_replication: the range [{start}, {end}) goes past the model's "
                f"{len(layers)} layers ({stack.path})"
            )
    order = [i for start, end in ranges for i in range(start, end)]
    configs = _Configs()
    inner_config = getattr(stack.inner, "config", None)
    config = None if inner_config is None else configs.copy(inner_config)
    copies = []
    for position, index in enumerate(order):
        layer = _Copier(configs).copy(layers[index])  # a copy per position
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # PEFT's workaround for transformers' KV cache
                module.layer_idx = position  # type: ignore[assignment]  # an int attribute
        copies.append(layer)
    copier = _Copier(configs)
    copier.modules[id(layers)] = nn.ModuleList(copies)
    new = copier.copy(model)
    owner = copier.modules.get(id(stack.owner))
    if owner is None or getattr(owner, stack.attr) is not copier.modules[id(layers)]:
        raise ValueError(NOT_FOUND)  # the stack is not a submodule of the model's tree
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(order)
        types = getattr(config, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == len(layers):
            config.layer_types = type(types)(types[i] for i in order)
    return new


def separate_copies(model: nn.Module, spec: Any) -> None:
    """Before a merge, in the merge's own copy ``model`` of a compiled model: the target
    layers that are copies of one layer get parameter objects of their own (over the same
    storage), so each copy merges into its own new weight. Without this the merge would
    take them for tied weights, which it merges once for all their holders (PEFT merges a
    replicated model that way: every copy's update lands in the one shared weight)."""
    if spec_replication(spec) is None:
        return
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules():
        if branches_of(module):
            for name, p in module._parameters.items():
                if p is not None:
                    holders.setdefault(id(p), []).append((path, module, name))
    for group in holders.values():
        if len(group) > 1 and _positions_of_one_layer([path for path, _, _ in group]):
            for _, module, name in group[1:]:
                p = module._parameters[name]
                assert p is not None
                kind = find_kind(module)
                own = share_parameter(p) if kind is None else kind.share_parameter(module, name, p)
                module._parameters[name] = own


def _positions_of_one_layer(paths: list[str]) -> bool:
    """Whether ``paths`` differ in one segment only, a layer index (``model.layers.1.mlp``,
    ``model.layers.2.mlp``): copies of one layer, not a tie between different modules."""
    split = [path.split(".") for path in paths]
    if len({len(parts) for parts in split}) != 1:
        return False
    differing = [i for i, seg in enumerate(zip(*split, strict=True)) if len(set(seg)) > 1]
    return len(differing) == 1 and all(parts[differing[0]].isdigit() for parts in split)


class _Configs:
    """Configs deep-copied once each, in one memo, so a sub-config stays its parent's."""

    def __init__(self) -> None:
        self.copies: dict[int, Any] = {}
        self.memo: dict[int, Any] = {}

    def __contains__(self, value: Any) -> bool:
        return id(value) in self.copies or _is_config(value)

    def copy(self, value: Any) -> Any:
        if id(value) not in self.copies:
            self.copies[id(value)] = copy.deepcopy(value, self.memo)
        return self.copies[id(value)]


class _Copier:
    """Copies modules over the same tensors, memoised (shared modules stay shared)."""

    def __init__(self, configs: _Configs) -> None:
        self.modules: dict[int, nn.Module] = {}
        self.configs = configs

    def copy(self, module: nn.Module) -> nn.Module:
        if id(module) in self.modules:
            return self.modules[id(module)]
        new = module.__class__.__new__(module.__class__)
        self.modules[id(module)] = new
        state = module.__dict__.copy()  # hook dicts stay the original's: share_clone copies them
        for key, value in state.items():
            if value in self.configs:
                state[key] = self.configs.copy(value)
        state["_parameters"] = dict(module._parameters)
        state["_buffers"] = dict(module._buffers)
        state["_modules"] = {
            name: None if child is None else self.copy(child)
            for name, child in module._modules.items()
        }
        new.__dict__.update(state)
        return new


def _is_config(value: Any) -> bool:
    cls = type(value)
    return cls.__module__.startswith("transformers") and cls.__name__.endswith(
        ("Config", "GenerationConfig")
    )
