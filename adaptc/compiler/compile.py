"""``compile(model, spec)``: plan, copy, attach branches, trace, insert, (merge).

The pipeline is explicit and one-way::

    spec ──load──► Spec ──build_plan──► Plan
    model ──share_clone──► copy (shared, frozen weights)
          ──attach──► branches under target layers, modules_to_save copies, trainable biases
          ──frontier──► graph modules around every target
          ──insert_branches──► adapter nodes in each graph
          ──merge (if spec.merge)──► plain layers with each method's merged weights
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from adaptc.compiler import retrace  # noqa: F401  (installs the pattern hooks)
from adaptc.compiler.clone import share_clone
from adaptc.compiler.errors import AdaptcWarning, CompileError, NoTargetsError
from adaptc.compiler.inplace import unmerged
from adaptc.compiler.parameters import (
    ParameterHost,
    host_parameters,
    merged_owner,
    parameter_slots,
)
from adaptc.compiler.passes import QuantizedMerge, merge_graph, merged_layer
from adaptc.compiler.saved import ModulesToSave
from adaptc.compiler.state import STATE, Compiled, compiled, compiled_info, rebuild
from adaptc.compiler.tied import merge_tied, tie_branches, untie_config
from adaptc.compiler.trace import AdaptedLayer, drop_checkpoint_hooks, frontier, is_adapted_graph
from adaptc.dtypes import DTYPES
from adaptc.layers import PARAMETER_KIND, kind_of
from adaptc.methods.base import Branch
from adaptc.methods.registry import branches_of, method
from adaptc.plan.match import TargetError
from adaptc.plan.plan import Plan, PlannedTarget, build_plan
from adaptc.plan.replicate import replicated, separate_copies, spec_replication
from adaptc.spec import Spec, load_spec

__all__ = [
    "AdaptcWarning",
    "CompileError",
    "Compiled",
    "attach_branch",
    "compile",
    "compiled",
    "compiled_info",
    "merge",
    "rebuild",
]


def compile(model: nn.Module, spec: Spec | Any) -> nn.Module:
    """A new model with the spec's adapters; ``model`` is left untouched.

    Base weights are shared with ``model`` (new frozen ``Parameter`` objects over the same
    storage), adapter weights are new. The first adapter of the spec is active.
    """
    with gc_paused():
        return _compile(model, spec)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building thousands of graph nodes would
    otherwise trigger full collections over the whole model (a 7B compile took 0.12 s,
    or 0.35 s when one struck). Nothing is collected less, only later."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _compile(model: nn.Module, spec: Spec | Any) -> nn.Module:
    spec = load_spec(spec)
    _check_not_compiled(model, spec)
    try:
        ranges = spec_replication(spec)  # layer_replication: a new stack beside the original's
        base = model if ranges is None else replicated(model, ranges)
        plan = build_plan(base, spec, replicated=True)
    except TargetError as exc:
        raise NoTargetsError(str(exc)) from None
    except ValueError as exc:
        raise CompileError(str(exc)) from None
    for message in plan.warnings:
        warnings.warn(message, AdaptcWarning, stacklevel=4)  # the caller of adaptc.compile
    new = share_clone(base)
    modules = dict(new.named_modules(remove_duplicate=False))
    active = (next(iter(spec.adapters)),)
    parameters = [t for t in plan.targets if t.layer_type == PARAMETER_KIND]
    slots, owners = parameter_slots(new, parameters)  # a targeted parameter's "layer"
    targets = _attach_branches({**modules, **slots}, plan)
    _make_biases_trainable(new, plan)
    targets -= {id(s) for s in slots.values()}  # their hosts are the leaves
    targets |= host_parameters(new, owners, active)
    wrappers = _wrap_modules_to_save(new, plan)
    holders = _holders(new, targets)
    root = frontier(new, lambda m: id(m) in holders, targets, wrappers, active, spec.compile)
    root.__dict__[STATE] = Compiled(spec, plan, active)
    for name, settings in spec.adapters.items():  # model-level behaviour of each method
        method(settings.method).finish(root, name, settings)
    return merge(root) if spec.merge else root


@torch.no_grad()
def merge(
    model: nn.Module,
    *,
    adapters: list[str] | None = None,
    safe: bool = True,
    quantized: Literal["dequantize", "requantize"] | None = None,
    dtype: torch.dtype | None = None,
    errors: dict[str, float] | None = None,
) -> nn.Module:
    """A new model with the adapters folded into the base weights and no adapter nodes.

    The unmerged ``model`` (and the user's original) stay valid and unchanged. ``safe``
    checks that merged weights are finite and names the adapter and module when not.

    A quantized layer (bitsandbytes, …) is dequantized by default: the merged layer is a
    float ``nn.Linear`` holding ``W_deq + s·ΔW`` exactly, in ``dtype`` when given (else the
    dequantized weight's). ``quantized="requantize"`` writes it back in its own format
    instead, which is lossy: the largest absolute error per layer goes into ``errors``
    (by target path) and the largest of all is reported in an ``AdaptcWarning``. Both
    default to the spec's ``base_model.quantization`` (``merge``, ``merge_dtype``).
    """
    info = compiled(model, "merge()")
    declared = info.spec.quantization
    mode = quantized or (declared.merge if declared is not None else "dequantize")
    if dtype is None and declared is not None and declared.merge_dtype is not None:
        dtype = DTYPES[declared.merge_dtype]
    how = QuantizedMerge(mode, dtype)
    with gc_paused():
        new = _merge(model, info, adapters=adapters, safe=safe, quantized=how)
    if errors is not None:
        errors.update(how.errors)
    if how.errors:
        worst = max(how.errors, key=how.errors.__getitem__)
        warnings.warn(
            f"requantized {len(how.errors)} merged layer(s) in their quantized format: the "
            f"largest error is {how.errors[worst]:.3g} ({worst}); merge with "
            "quantized='dequantize' for the exact float weights",
            AdaptcWarning,
            stacklevel=2,
        )
    return new


def _merge(
    model: nn.Module,
    info: Compiled,
    *,
    adapters: list[str] | None,
    safe: bool,
    quantized: QuantizedMerge,
) -> nn.Module:
    names = adapters if adapters is not None else list(info.active)
    with unmerged(model):  # merged in place: merge from the original weights
        new = share_clone(model)
    separate_copies(new, info.spec)  # a replicated layer's copies: each merges on its own
    notes = merge_tied(new, names, safe=safe)  # weights tied layers share: merged once
    for module in list(new.modules()):
        if isinstance(module, ParameterHost):  # unwrapped below: the module, merged
            module._modules["base_layer"] = merged_owner(module, names, safe=safe)
        elif isinstance(module, AdaptedLayer):  # unwrapped below: no graph to rebuild
            layer = module._modules["base_layer"]
            assert layer is not None
            if branches_of(layer):
                module._modules["base_layer"] = merged_layer(
                    layer, names, safe=safe, quantized=quantized
                )
        elif is_adapted_graph(module):
            merge_graph(module, names, safe=safe, quantized=quantized)  # type: ignore[arg-type]
    new = unwrap_adapted_layers(new)
    new.__dict__.pop(STATE, None)  # a plain model: it can be compiled again
    drop_checkpoint_hooks(new)  # the base model did not have them
    for note in notes + untie_config(new):
        warnings.warn(note, AdaptcWarning, stacklevel=4)  # the caller of adaptc.merge
    return new


def _check_not_compiled(model: nn.Module, spec: Spec) -> None:
    existing = {m.adapter for m in model.modules() if isinstance(m, Branch)}
    twice = sorted(existing & set(spec.adapters))
    if twice:
        raise CompileError(
            f"the model already has adapter {twice[0]!r} (it was compiled by adaptc); "
            "compile the original model, or give the new adapter another name"
        )
    if existing or compiled_info(model) is not None:
        raise CompileError(
            "the model was already compiled by adaptc; compile the original model with a spec "
            "that lists every adapter"
        )


def _attach_branches(modules: dict[str, nn.Module], plan: Plan) -> set[int]:
    """Build each planned branch under its (copied) layer; returns the ids of target layers."""
    leaves: set[int] = set()
    built: dict[tuple[str, str, str], Branch] = {}
    for target in plan.targets:
        branch = attach_branch(modules[target.path], target)
        built[(target.adapter, target.method, target.path)] = branch
        tie_branches([target], built)  # a tied output head follows the input embedding
        leaves.add(id(modules[target.path]))
    return leaves


def attach_branch(layer: nn.Module, target: PlannedTarget) -> Branch:
    """Build ``target``'s branch under ``layer`` (a layer of the compiled model)."""
    entry = method(target.method)
    branch, replaced = entry.make_branch(kind_of(layer, target.path), layer, target.settings)
    for name, tensor in replaced.items():  # PiSSA/OLoRA residuals: new tensors, ours only
        layer._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    layer.add_module(entry.child_name(target.adapter), branch)
    return branch


def _make_biases_trainable(model: nn.Module, plan: Plan) -> None:
    """Trainable biases get their own storage, so training never writes into the original.
    A bias several modules hold (the copies of a replicated layer) stays one, as in PEFT."""
    trained: dict[int, nn.Parameter] = {}  # id(frozen bias) -> its trainable copy
    for name, _ in plan.trainable_biases:
        owner_path, _, attr = name.rpartition(".")
        p = model.get_submodule(owner_path)._parameters[attr]
        if p is not None and not p.requires_grad:
            trained[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=True)
    if not trained:
        return
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) in trained:
                module._parameters[attr] = trained[id(p)]


def _wrap_modules_to_save(model: nn.Module, plan: Plan) -> set[int]:
    by_path: dict[str, list[str]] = {}
    for adapter, path, _ in plan.modules_to_save:
        by_path.setdefault(path, []).append(adapter)
    wrapped: set[int] = set()
    for path, adapters in by_path.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        wrapper = ModulesToSave(parent._modules[name], adapters)  # type: ignore[arg-type]
        parent._modules[name] = wrapper
        wrapped.add(id(wrapper))
    return wrapped


def _holders(model: nn.Module, leaves: set[int]) -> set[int]:
    """Ids of the leaves and of every module that contains one."""
    holders: set[int] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in leaves:
            holders.add(id(module))
            parts = path.split(".") if path else []
            for i in range(len(parts)):
                holders.add(id(model.get_submodule(".".join(parts[:i]))))
    return holders


def unwrap_adapted_layers(model: nn.Module) -> nn.Module:
    """After merging, an ``AdaptedLayer`` is just its layer and a saved module its active
    copy: put them back in their places, so the model has the original's structure."""

    def plain(module: nn.Module) -> nn.Module:
        if isinstance(module, AdaptedLayer):
            return module.base_layer  # type: ignore[no-any-return]
        if isinstance(module, ModulesToSave):
            return module.active_module
        return module

    model = plain(model)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = plain(child)
    return model
