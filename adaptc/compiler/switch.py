"""Choosing the active adapters of a compiled model, and running the base model alone.

Switching rebuilds each adapted graph from its base graph with the branches of the chosen
adapters (no branch nodes at all for none), and points ``modules_to_save`` wrappers at the
chosen adapter's copy (or the frozen original). Adapter weights are not touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import fx, nn

from adaptc.compiler.compile import Compiled, CompileError, compiled_info
from adaptc.compiler.passes import insert_branches
from adaptc.compiler.saved import ModulesToSave
from adaptc.compiler.trace import is_adapted_graph

__all__ = ["active_adapters", "disabled", "set_active"]


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return _info(model).active


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters of ``model`` (in place; a no-op for the weights)."""
    info = _info(model)
    chosen = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in chosen if n not in info.spec.adapters]
    if unknown:
        raise CompileError(
            f"the model has no adapter {unknown[0]!r} (has: {', '.join(info.spec.adapters)})"
        )
    _apply(model, chosen)
    info.active = chosen


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block: outputs equal the original model's."""
    info = _info(model)
    previous = info.active
    _apply(model, ())
    try:
        yield model
    finally:
        _apply(model, previous)


def _apply(model: nn.Module, active: tuple[str, ...], *, mixed: bool = False) -> None:
    for module in model.modules():
        if is_adapted_graph(module):
            assert isinstance(module, fx.GraphModule)
            insert_branches(module, active, mixed=mixed)
        elif isinstance(module, ModulesToSave):
            module.active_adapter = next((a for a in active if a in module.modules_to_save), None)


def _info(model: nn.Module) -> Compiled:
    info = compiled_info(model)
    if info is None:
        raise CompileError("expected a model returned by adaptc.compile()")
    return info
