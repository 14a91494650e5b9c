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

from adaptc.compiler.clone import share_clone
from adaptc.compiler.compile import (
    Compiled,
    CompileError,
    _unwrap_adapted_layers,
    compiled_info,
)
from adaptc.compiler.passes import insert_branches
from adaptc.compiler.saved import ModulesToSave, _trainable_copy
from adaptc.compiler.trace import _wrap_leaf, is_adapted_graph
from adaptc.layers import LoraBranch, rule_for
from adaptc.plan.plan import Plan, build_plan
from adaptc.spec import Spec, load_spec

__all__ = ["add_adapter", "delete_adapter"]


def add_adapter(model: nn.Module, spec: Spec | Any) -> list[str]:
    """Add the adapters of ``spec`` to the compiled ``model`` (in place); returns their names.

    They start inactive (``adaptc.set_active`` chooses). Their names must be new; their
    ``modules_to_save`` must already be saved by the model, and their bias mode ``none``
    (both change modules other adapters share: compile the original with every adapter).
    """
    info = _info(model)
    new_spec = load_spec(spec)
    names = list(new_spec.adapters)
    taken = sorted(set(names) & set(info.spec.adapters))
    if taken:
        raise CompileError(f"the model already has adapter {taken[0]!r}")
    plan = build_plan(_original_view(model), _with_task(new_spec, info.spec))
    layers = _layers_by_original_path(model)
    saved = {p: m for p, m in layers.items() if isinstance(m, ModulesToSave)}
    for name, settings in new_spec.adapters.items():
        if settings.bias != "none":
            raise CompileError(f"adapter {name!r}: bias {settings.bias!r} needs a recompile")
    for name, path, _ in plan.modules_to_save:
        if path not in saved:
            raise CompileError(
                f"adapter {name!r} saves {path}, which the model does not save yet: "
                "compile the original model with every adapter"
            )
    called = _called_layers(model)
    for target in plan.targets:
        layer = layers[target.path]
        rule = rule_for(layer)
        assert rule is not None
        settings = new_spec.adapters[target.adapter]
        branch, replaced = rule.make_branch(layer, target.branch_config(settings))
        if replaced:
            raise CompileError(
                f"adapter {target.adapter!r}: init {settings.init!r} rewrites base weights "
                "other adapters share; compile the original model with every adapter"
            )
        layer.add_module(f"lora_{target.adapter}", branch)
        if id(layer) not in called:
            _replace(model, layer, _wrap_leaf(layer))
            called.add(id(layer))
    for name, path, _ in plan.modules_to_save:
        saved[path].modules_to_save[name] = _trainable_copy(saved[path].original_module)
    merged_spec = Spec.model_validate(
        {
            **info.spec.model_dump(by_alias=True),
            "adapters": {**info.spec.adapters, **new_spec.adapters},
        }
    )
    info.spec = merged_spec
    info.plan = Plan(
        info.plan.targets + plan.targets,
        info.plan.modules_to_save + plan.modules_to_save,
        info.plan.trainable_biases,
        info.plan.base_params,
        info.plan.warnings + plan.warnings,
    )
    _refresh(model, info.active)
    return names


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from the compiled ``model`` (in place)."""
    info = _info(model)
    if name not in info.spec.adapters:
        raise CompileError(
            f"the model has no adapter {name!r} (has: {', '.join(info.spec.adapters)})"
        )
    if len(info.spec.adapters) == 1:
        raise CompileError(f"{name!r} is the model's only adapter: use the original model instead")
    for module in model.modules():
        child = module._modules.get(f"lora_{name}")
        if isinstance(child, LoraBranch):
            del module._modules[f"lora_{name}"]
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            del module.modules_to_save[name]
    adapters = {k: v for k, v in info.spec.adapters.items() if k != name}
    info.spec = Spec.model_validate({**info.spec.model_dump(by_alias=True), "adapters": adapters})
    info.plan = Plan(
        tuple(t for t in info.plan.targets if t.adapter != name),
        tuple(s for s in info.plan.modules_to_save if s[0] != name),
        info.plan.trainable_biases,
        info.plan.base_params,
        info.plan.warnings,
    )
    active = tuple(a for a in info.active if a != name) or (next(iter(adapters)),)
    _refresh(model, active)
    info.active = active


def _info(model: nn.Module) -> Compiled:
    info = compiled_info(model)
    if info is None:
        raise CompileError("expected a model returned by adaptc.compile()")
    return info


def _with_task(spec: Spec, compiled: Spec) -> Spec:
    if spec.task_type is None and compiled.task_type is not None:
        return spec.model_copy(update={"task_type": compiled.task_type})
    return spec


def _original_view(model: nn.Module) -> nn.Module:
    """The compiled model seen as the original: wrappers unwrapped, branches dropped."""
    view = share_clone(model)
    for module in list(view.modules()):
        for key, child in list(module._modules.items()):
            if isinstance(child, LoraBranch):
                del module._modules[key]
            elif isinstance(child, ModulesToSave):
                module._modules[key] = child.original_module
    return _unwrap_adapted_layers(view)


def _layers_by_original_path(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by their path in the original model; a wrapped layer maps to the layer."""
    out: dict[str, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoraBranch):
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


def _refresh(model: nn.Module, active: tuple[str, ...]) -> None:
    for module in model.modules():
        if is_adapted_graph(module):
            assert isinstance(module, fx.GraphModule)
            insert_branches(module, active)
        elif isinstance(module, ModulesToSave):
            module.active_adapter = next((a for a in active if a in module.modules_to_save), None)
