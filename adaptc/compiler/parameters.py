"""Targeted parameters in a compiled model: the module that owns them, in a graph of its own.

A module whose parameters are targeted (PEFT's ``target_parameters``: a mixture of
experts' fused stacks) rarely traces (its forward loops over the experts a batch hits),
and it reads its parameters itself. So the compiler puts it, as ``base_layer``, in a
:class:`ParameterHost`: a graph that reads each targeted parameter, passes it through its
:class:`~adaptc.layers.ParameterSlot` (where the adapters' updates are emitted, as after
any layer), and calls the module with the adapted values in place of its own
(``torch.func.functional_call``). Nothing of the module is changed, and the update
reaches the module exactly where it reads the parameter, as PEFT's parametrization does::

    def forward(self, *args, **kwargs):
        base_layer_gate_up_proj = self.base_layer.gate_up_proj
        adapted_parameters_gate_up_proj = self.adapted_parameters.gate_up_proj(
            base_layer_gate_up_proj)
        add_update = adaptc_methods_lora_parameter_add_update(
            adapted_parameters_gate_up_proj, …)
        base_layer = self.base_layer
        return adaptc_compiler_parameters_call_with(
            base_layer, {'gate_up_proj': add_update}, args, kwargs)

A host is a leaf in its parent's graph. Merging gives back the module itself, with new
parameters ``W + s·ΔW`` (the unmerged model and the user's keep theirs).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from adaptc.compiler.passes import MergeError
from adaptc.compiler.trace import AdaptedLayer, _graph_module
from adaptc.layers import ParameterSlot, kind_of
from adaptc.methods.lora.parameter import ParameterLoraBranch
from adaptc.methods.registry import branches_of, method_of
from adaptc.plan.parameters import is_transposed
from adaptc.plan.plan import PlannedTarget

__all__ = [
    "SLOTS",
    "ParameterHost",
    "call_with",
    "host_parameters",
    "merged_owner",
    "merged_parameters",
    "parameter_slots",
    "renest",
    "slots_by_path",
]

SLOTS = "adapted_parameters"  # the host's ModuleDict of slots, by parameter name


class ParameterHost(AdaptedLayer):
    """A module whose parameters carry adapters (``base_layer``), and the slot of each
    targeted parameter (``adapted_parameters.<name>``). Other attributes are the module's."""

    def slots(self) -> list[ParameterSlot]:
        slots = self._modules[SLOTS]
        assert slots is not None
        return [m for m in slots.children() if isinstance(m, ParameterSlot)]


def call_with(
    module: nn.Module, values: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: Any
) -> Any:
    """``module(*args, **kwargs)`` reading ``values`` in place of its own parameters."""
    return torch.func.functional_call(module, values, args, kwargs, strict=False)


def parameter_slots(
    model: nn.Module, targets: Sequence[PlannedTarget]
) -> tuple[dict[str, ParameterSlot], list[nn.Module]]:
    """The slot of each parameter ``targets`` name (by its path) in ``model`` (a compiled
    copy), and the holders to turn into hosts (:func:`host_parameters`) once the
    branches hang under the slots: each holds a module as ``base_layer`` and its slots."""
    slots: dict[str, ParameterSlot] = {}
    holders: dict[int, nn.Module] = {}
    for target in targets:
        if target.path in slots:
            continue
        owner_path, _, name = target.path.rpartition(".")
        owner = model.get_submodule(owner_path)
        holder = holders.get(id(owner))
        if holder is None:  # one module under two names: one holder
            holder = holders[id(owner)] = nn.Module()
            holder.base_layer = owner
            holder.add_module(SLOTS, nn.ModuleDict())
            holder.train(owner.training)
        param = owner._parameters[name]
        assert param is not None
        slot = ParameterSlot(owner_path, name, param, is_transposed(owner))
        holder.get_submodule(SLOTS).add_module(name, slot)
        slots[target.path] = slot
    return slots, list(holders.values())


def host_parameters(model: nn.Module, holders: list[nn.Module], active: Sequence[str]) -> set[int]:
    """Put each holder's module in ``model`` in a :class:`ParameterHost` (its graph with
    the ``active`` adapters' branches); returns the hosts' ids."""
    built: dict[int, ParameterHost] = {}
    for holder in holders:
        owner = holder.get_submodule("base_layer")
        slots = holder.get_submodule(SLOTS)
        order = [n for n, _ in owner.named_parameters(recurse=False) if n in slots._modules]
        slots._modules = {n: slots._modules[n] for n in order}  # the module's order
        _nest_file_paths([s for s in slots.children() if isinstance(s, ParameterSlot)])
        built[id(owner)] = _host(holder, order, active)
    _replace(model, built)
    return {id(h) for h in built.values()}


def slots_by_path(model: nn.Module) -> dict[str, ParameterSlot]:
    """The slots of a compiled ``model`` by their parameter's path in the user's model."""
    return {
        f"{slot.owner}.{slot.name}": slot
        for host in model.modules()
        if isinstance(host, ParameterHost)
        for slot in host.slots()
    }


def renest(model: nn.Module) -> None:
    """Recompute PEFT's nested file paths of every parameter branch (after adding some)."""
    for host in model.modules():
        if isinstance(host, ParameterHost):
            _nest_file_paths(host.slots())


def _nest_file_paths(slots: list[ParameterSlot]) -> None:
    """PEFT's file keys: one wrapper per targeted parameter of a module, nested in the
    module's parameter order (the first innermost), so a branch's tensors are under the
    module's path with one ``.base_layer`` per later parameter its adapter targets."""
    for i, slot in enumerate(slots):
        for branch in branches_of(slot):
            assert isinstance(branch, ParameterLoraBranch)
            later = [s for s in slots[i + 1 :] if branches_of(s, [branch.adapter])]
            branch.nested_path = slot.owner + ".base_layer" * len(later)


def _host(holder: nn.Module, names: list[str], active: Sequence[str]) -> ParameterHost:
    graph = fx.Graph()
    args = graph.placeholder("*args")
    kwargs = graph.placeholder("**kwargs")
    values = {}
    for name in names:
        weight = graph.get_attr(f"base_layer.{name}")
        values[name] = graph.call_module(f"{SLOTS}.{name}", (weight,))
    module = graph.get_attr("base_layer")
    graph.output(graph.call_function(call_with, (module, values, args, kwargs)))
    owner = holder.base_layer
    host = _graph_module(holder, graph, f"Adapted{type(owner).__name__}", ParameterHost, active)
    assert isinstance(host, ParameterHost)
    return host


def _replace(model: nn.Module, hosts: dict[int, ParameterHost]) -> None:
    """Put each host where its module was (under every parent that holds it)."""
    for module in list(model.modules()):
        for name, child in module._modules.items():
            if child is not None and id(child) in hosts and module is not hosts[id(child)]:
                module._modules[name] = hosts[id(child)]


@torch.no_grad()
def merged_owner(host: ParameterHost, adapters: Sequence[str], *, safe: bool) -> nn.Module:
    """A shallow copy of ``host``'s module whose targeted parameters hold ``W + s·ΔW`` of
    ``adapters`` (new frozen tensors); the module itself is unchanged."""
    owner = host._modules["base_layer"]
    assert owner is not None
    new = copy.copy(owner)
    new._parameters = dict(owner._parameters)
    for _, name, value in merged_parameters(host, adapters, safe=safe):
        new._parameters[name] = value
    return new


@torch.no_grad()
def merged_parameters(
    host: ParameterHost, adapters: Sequence[str], *, safe: bool
) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """``(module, name, W + s·ΔW)`` for each of ``host``'s parameters that ``adapters``
    adapt: new frozen parameters; nothing is changed."""
    owner = host._modules["base_layer"]
    assert owner is not None
    found = []
    for slot in host.slots():
        branches = branches_of(slot, adapters)
        if not branches:
            continue
        kind = kind_of(slot)
        weight = owner._parameters[slot.name]
        assert weight is not None
        value: torch.Tensor = weight
        for branch in branches:
            value, _ = method_of(branch).merge(kind, slot, branch, value, None)
            if safe and not torch.isfinite(value).all():
                raise MergeError(
                    f"merging adapter {branch.adapter!r} into {branch.target} gives "
                    "non-finite weights; the adapter seems broken"
                )
        found.append((owner, slot.name, nn.Parameter(value.detach(), requires_grad=False)))
    return found
