"""The state of a compiled model (:class:`Compiled`, on its root) and :func:`rebuild`, which
re-emits its graphs for the adapters it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from adaptc.compiler.errors import CompileError
from adaptc.compiler.passes import SiteEmitter, insert_branches
from adaptc.compiler.saved import ModulesToSave
from adaptc.compiler.trace import is_adapted_graph
from adaptc.plan.plan import Plan
from adaptc.spec import Spec

__all__ = ["STATE", "Compiled", "compiled", "compiled_info", "rebuild"]


@dataclass
class Compiled:
    """What adaptc knows about a model it produced, kept on the model's root: the one
    place the state of a compiled model lives (:func:`compiled` reads it)."""

    spec: Spec  # every adapter the model carries
    plan: Plan  # where each adapter's branches are
    active: tuple[str, ...]  # the adapters the graphs run
    mixed: Any = None  # the state of a running mixed batch (adaptc.adapters.mixed), if any
    merged: Any = None  # adapters merged in place (adaptc.compiler.inplace.MergedWeights)
    disabled: bool = False  # inside adaptc.disabled(): the graphs run no branch


STATE = "_adaptc"  # the root module's __dict__ key


def compiled_info(model: nn.Module) -> Compiled | None:
    """The state of a compiled model, or None for any other model."""
    info = model.__dict__.get(STATE)
    return info if isinstance(info, Compiled) else None


def compiled(model: nn.Module, what: str = "this") -> Compiled:
    """The state of a compiled model; a :class:`CompileError` naming ``what`` otherwise."""
    info = compiled_info(getattr(model, "_orig_mod", model))
    if info is None:
        raise CompileError(
            f"{what} takes a model returned by adaptc.compile() or adaptc.load_adapter(), "
            f"not a {type(model).__name__}"
        )
    return info


def rebuild(model: nn.Module, active: tuple[str, ...], *, site: SiteEmitter | None = None) -> None:
    """Re-emit every adapted graph of ``model`` with the branches of ``active`` (``site``:
    one node per target call instead, as a mixed batch emits) and point ``modules_to_save``
    wrappers at the first active adapter that has a copy (or the frozen original).

    No branch is emitted while the adapters are disabled (:func:`adaptc.disabled`); a
    layer with adapters merged in place runs alone (:mod:`adaptc.compiler.inplace`)."""
    info = compiled_info(model)
    emitted = active
    if info is not None and info.disabled:
        emitted = active = ()
    for module in model.modules():
        if is_adapted_graph(module):
            assert isinstance(module, fx.GraphModule)
            insert_branches(module, emitted, site=site)
        elif isinstance(module, ModulesToSave):
            module.active_adapter = next((a for a in active if a in module.modules_to_save), None)
