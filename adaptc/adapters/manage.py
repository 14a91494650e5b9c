"""Adding and deleting adapters on a compiled model, without recompiling the rest.

``add_adapter(model, spec)`` plans the new adapter against the model's original structure
(the compiled copy seen without its wrappers), hangs new branches under the target layers
— wrapping a layer in an :class:`~adaptc.compiler.trace.AdaptedLayer` when no graph calls
it yet — and rebuilds each graph from its base graph, so the branches of the active
adapters are emitted and nothing else changes. The new adapter starts inactive, as with
PEFT's ``add_adapter``. ``delete_adapter`` removes an adapter's branches and copies.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from adaptc.compiler import CompileError, compiled, rebuild
from adaptc.compiler.clone import share_clone
from adaptc.compiler.compile import unwrap_adapted_layers
from adaptc.compiler.parameters import renest, slots_by_path
from adaptc.compiler.saved import ModulesToSave, trainable_copy
from adaptc.compiler.tied import tie_branches
from adaptc.compiler.trace import is_adapted_graph, wrap_leaf
from adaptc.layers import PARAMETER_KIND, kind_of
from adaptc.methods.base import Branch
from adaptc.methods.registry import method
from adaptc.plan.plan import Plan, build_plan
from adaptc.plan.replicate import ranges_text, spec_replication
from adaptc.spec import Spec, load_spec

__all__ = ["RecompileNeeded", "add_adapter", "delete_adapter"]


def add_adapter(model: nn.Module, spec: Spec | Any) -> list[str]:
    """Add the adapters of ``spec`` to the compiled ``model`` (in place); returns their names.

    They start inactive (``adaptc.set_active`` chooses). Their names must be new; their
    ``modules_to_save`` must already be saved by the model, and their bias mode ``none``
    (both change modules other adapters share: :class:`RecompileNeeded` says so, and
    nothing is added).
    """
    info = compiled(model, "add_adapter()")
    new_spec = load_spec(spec)
    names = list(new_spec.adapters)
    taken = sorted(set(names) & set(info.spec.adapters))
    if taken:
        raise CompileError(f"the model already has adapter {taken[0]!r}")
    ranges, mine = spec_replication(info.spec), spec_replication(new_spec)
    if mine != ranges and info.spec.adapters:  # a recompile would not help: not RecompileNeeded
        raise CompileError(
            f"adapter {names[0]!r}: layer_replication must be the model's "
            f"({ranges_text(ranges)}, not {ranges_text(mine)}): its adapters share its layers"
        )
    plan = build_plan(_original_view(model), _with_task(new_spec, info.spec), replicated=True)
    layers = _layers_by_original_path(model)
    saved = {p: m for p, m in layers.items() if isinstance(m, ModulesToSave)}
    reason = _recompile_reason(new_spec, plan, saved)
    if reason is not None:
        raise RecompileNeeded(reason)
    called = _called_layers(model)
    slots = slots_by_path(model)
    built = []  # every branch first: a refusal leaves the model as it was
    by_target: dict[tuple[str, str, str], Branch] = {}
    for target in plan.targets:
        if target.layer_type == PARAMETER_KIND and target.path not in slots:
            raise RecompileNeeded(
                f"adapter {target.adapter!r} targets {target.path}, a parameter the model "
                "does not adapt yet: compile the original model with every adapter"
            )
        layer = slots[target.path] if target.layer_type == PARAMETER_KIND else layers[target.path]
        entry = method(target.method)
        branch, replaced = entry.make_branch(kind_of(layer), layer, target.settings)
        assert not replaced, "_recompile_reason refuses inits that rewrite base weights"
        built.append((layer, entry.child_name(target.adapter), branch))
        by_target[(target.adapter, target.method, target.path)] = branch
        tie_branches([target], by_target)  # a tied output head follows the input embedding
    for layer, child_name, branch in built:
        layer.add_module(child_name, branch)
        if id(layer) not in called:
            _replace(model, layer, wrap_leaf(layer, options=info.spec.compile))
            called.add(id(layer))
    renest(model)
    for name, path, _ in plan.modules_to_save:
        saved[path].modules_to_save[name] = trainable_copy(saved[path].original_module)
    info.spec = info.spec.with_adapters({**info.spec.adapters, **new_spec.adapters})
    info.plan = info.plan.with_adapters(plan)
    rebuild(model, info.active)
    for name in names:  # model-level behaviour of each new adapter's method
        method(new_spec.adapters[name].method).finish(model, name, new_spec.adapters[name])
    return names


class RecompileNeeded(CompileError):
    """The adapter changes what the model's other adapters share: it cannot be added in
    place (compile the original model with every adapter)."""


def _recompile_reason(spec: Spec, plan: Plan, saved: dict[str, ModulesToSave]) -> str | None:
    for name, settings in spec.adapters.items():
        bias = getattr(settings, "bias", "none")
        if bias != "none":
            return f"adapter {name!r}: bias {bias!r} needs a recompile"
        init = getattr(settings, "init", None)
        if init in _REWRITING_INITS:
            return (
                f"adapter {name!r}: init {init!r} rewrites base weights other adapters share; "
                "compile the original model with every adapter"
            )
    for name, path, _ in plan.modules_to_save:
        if path not in saved:
            return (
                f"adapter {name!r} saves {path}, which the model does not save yet: "
                "compile the original model with every adapter"
            )
    return None


_REWRITING_INITS = ("pissa", "olora", "loftq")  # inits that replace the base weight


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from the compiled ``model`` (in place). The last one can go
    too (as with PEFT): the model then computes the base model's outputs, and adapters can
    be added again."""
    info = compiled(model, "delete_adapter()")
    if name not in info.spec.adapters:
        raise CompileError(
            f"the model has no adapter {name!r} (has: {', '.join(info.spec.adapters)})"
        )
    if info.merged is not None and name in info.merged.adapters:
        raise CompileError(
            f"Cannot delete adapter(s) [{name!r}] while they are merged. Please unmerge them first."
        )
    for module in list(model.modules()):  # its branches of every method (LoRA's tokens too)
        for key, child in list(module._modules.items()):
            if isinstance(child, Branch) and child.adapter == name:
                del module._modules[key]
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            del module.modules_to_save[name]
    adapters = {k: v for k, v in info.spec.adapters.items() if k != name}
    info.spec = info.spec.with_adapters(adapters)
    info.plan = info.plan.without_adapter(name)
    active = tuple(a for a in info.active if a != name) or tuple(adapters)[:1]
    rebuild(model, active)
    info.active = active


def _with_task(spec: Spec, compiled: Spec) -> Spec:
    if spec.task_type is None and compiled.task_type is not None:
        return spec.model_copy(update={"task_type": compiled.task_type})
    return spec


def _original_view(model: nn.Module) -> nn.Module:
    """The compiled model seen as the original: wrappers unwrapped, branches dropped."""
    view = share_clone(model)
    for module in list(view.modules()):
        for key, child in list(module._modules.items()):
            if isinstance(child, Branch):
                del module._modules[key]
            elif isinstance(child, ModulesToSave):
                module._modules[key] = child.original_module
    return unwrap_adapted_layers(view)


def _layers_by_original_path(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by their path in the original model; a wrapped layer maps to the layer."""
    out: dict[str, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Branch):
            continue
        if path == "base_layer" or path.endswith(".base_layer"):
            out[path.removesuffix("base_layer").removesuffix(".")] = module
        else:
            out.setdefault(path, module)
    return out


def _called_layers(model: nn.Module) -> set[int]:
    """Ids of the layers some adapted graph calls (they need no wrapper)."""
    called: set[int] = set()
    for module in model.modules():
        if is_adapted_graph(module):
            assert isinstance(module, fx.GraphModule)
            for node in module.meta["adaptc"]["base_graph"].nodes:
                if node.op == "call_module":
                    called.add(id(module.get_submodule(str(node.target))))
    return called


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in model.modules():
        for key, child in list(module._modules.items()):
            if child is old and module is not new:
                module._modules[key] = new
