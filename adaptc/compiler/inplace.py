"""Merging in place, exactly undone: PEFT's ``merge_adapter`` / ``unmerge_adapter``.

``merge_in_place(model)`` gives each target layer of the compiled ``model`` new frozen
parameters holding ``W + s·ΔW`` (computed as :func:`adaptc.merge` computes them; a kind
that keeps weights in a child, as attention's ``out_proj``, gets a new child) and stops
emitting the merged adapters' branches, so the forward costs what the base model's does.
The parameters the layers had — the ones shared with the user's model — are kept aside,
never written; ``unmerge_in_place`` puts those very objects back, so unmerging is exact
(PEFT subtracts the delta again, which drifts in bf16). The cost: the merged weights of
the target layers are held beside the originals while merged.

While merged, the model keeps its adapters and their weights (they can be saved, and
``modules_to_save`` copies stay routed to the active adapter). Active adapters that are not
merged still run as branches. The operations that would read the merged weights as the
base (another adaptc merge, running the base model alone) see the original weights
(:func:`unmerged`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adaptc.compiler.errors import AdaptcWarning, CompileError
from adaptc.compiler.parameters import ParameterHost, merged_parameters
from adaptc.compiler.passes import MERGED, merged_layer
from adaptc.compiler.state import compiled, rebuild
from adaptc.layers import ParameterSlot
from adaptc.methods.registry import branches_of

__all__ = ["MergedWeights", "merge_in_place", "merged_adapters", "unmerge_in_place", "unmerged"]


@dataclass(eq=False)
class MergedWeights:
    """What an in-place merge changed: the adapters merged, in order, and for each layer
    parameter or buffer replaced, the tensor it had before (restored by unmerging)."""

    adapters: tuple[str, ...] = ()
    # (layer, "_parameters", "_buffers" or "_modules", name, its value before the first merge)
    originals: list[tuple[nn.Module, str, str, Any]] = field(default_factory=list)
    layers: list[nn.Module] = field(default_factory=list)  # the layers merged into


def merged_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters merged in place into ``model``'s weights (empty when none)."""
    state = compiled(model, "merged_adapters()").merged
    return state.adapters if state is not None else ()


@torch.no_grad()
def merge_in_place(
    model: nn.Module, adapters: Sequence[str] | None = None, *, safe: bool = False
) -> tuple[str, ...]:
    """Merge ``adapters`` (default: the active ones) into ``model``'s target layers in place;
    returns the adapters merged now. Already merged ones are skipped with a warning, as
    PEFT does. ``safe`` checks the merged weights are finite before anything changes."""
    info = compiled(model, "merge_in_place()")
    names = tuple(info.active if adapters is None else adapters)
    unknown = [n for n in names if n not in info.spec.adapters]
    if unknown:
        raise CompileError(
            f"the model has no adapter {unknown[0]!r} (has: {', '.join(info.spec.adapters)})"
        )
    if info.mixed is not None:
        raise CompileError("cannot merge while a mixed batch runs")
    state = info.merged or MergedWeights()
    already = [n for n in names if n in state.adapters]
    todo = tuple(n for n in names if n not in state.adapters)
    if already:
        message = (
            "All adapters are already merged, nothing to do."
            if not todo
            else f"Already following adapters were merged {','.join(already)}. "
            f"You are now additionally merging {','.join(todo)}."
        )
        warnings.warn(message, AdaptcWarning, stacklevel=2)
    if not todo:
        return ()
    swaps = []  # every merged layer first: a non-finite weight leaves the model as it was
    layers = _layers(model, todo)
    for host in (m for m in model.modules() if isinstance(m, ParameterHost)):
        for owner, name, value in merged_parameters(host, todo, safe=safe):  # its module's
            swaps.append((owner, "_parameters", name, value))
    for layer in layers:
        if isinstance(layer, ParameterSlot):  # above: the parameter is its module's
            continue
        new = merged_layer(layer, todo, safe=safe)
        if type(new) is not type(layer):  # e.g. a quantized layer merges into a float one
            target = next(b.target for b in branches_of(layer, todo))
            raise CompileError(
                f"{target}: a {type(layer).__name__} cannot be merged in place (its merged "
                f"weights are a {type(new).__name__}); adaptc.merge() gives the merged model"
            )
        for where in ("_parameters", "_buffers", "_modules"):  # a kind may rebuild a child
            mine, theirs = getattr(layer, where), getattr(new, where)
            for name, value in theirs.items():
                if value is not mine.get(name):
                    swaps.append((layer, where, name, value))
    seen = {(id(layer), where, name) for layer, where, name, _ in state.originals}
    for layer, where, name, tensor in swaps:
        if (id(layer), where, name) not in seen:
            state.originals.append((layer, where, name, getattr(layer, where).get(name)))
            seen.add((id(layer), where, name))
        getattr(layer, where)[name] = tensor
    for layer in layers:
        layer.__dict__[MERGED] = (*layer.__dict__.get(MERGED, ()), *todo)
        state.layers.append(layer)
    state.adapters = (*state.adapters, *todo)
    info.merged = state
    rebuild(model, info.active)
    return todo


@torch.no_grad()
def unmerge_in_place(model: nn.Module) -> tuple[str, ...]:
    """Put back the exact weights ``model`` had before :func:`merge_in_place`; returns the
    adapters that were merged (a no-op, returning ``()``, when none was)."""
    info = compiled(model, "unmerge_in_place()")
    state: MergedWeights | None = info.merged
    if state is None:
        return ()
    for layer, where, name, tensor in state.originals:
        getattr(layer, where)[name] = tensor
    for layer in state.layers:
        layer.__dict__.pop(MERGED, None)
    info.merged = None
    rebuild(model, info.active)
    return state.adapters


@contextmanager
def unmerged(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the layers hold their original (unmerged) weights; the graphs are
    not rebuilt (the caller emits what it needs). A no-op when nothing is merged."""
    info = compiled(model, "unmerged()")
    state = info.merged
    if state is None:
        yield model
        return
    merged = [getattr(layer, where)[name] for layer, where, name, _ in state.originals]
    for layer, where, name, tensor in state.originals:
        getattr(layer, where)[name] = tensor
    try:
        yield model
    finally:
        for (layer, where, name, _), tensor in zip(state.originals, merged, strict=True):
            getattr(layer, where)[name] = tensor


def _layers(model: nn.Module, adapters: Sequence[str]) -> list[nn.Module]:
    return [m for m in model.modules() if branches_of(m, adapters)]
