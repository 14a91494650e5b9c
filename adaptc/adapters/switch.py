"""Choosing the active adapters of a compiled model, and running the base model alone.

Switching rebuilds each adapted graph from its base graph with the branches of the chosen
adapters (no branch nodes at all for none), and points ``modules_to_save`` wrappers at the
chosen adapter's copy (or the frozen original). Adapter weights are not touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from adaptc.compiler import CompileError, compiled, rebuild

__all__ = ["active_adapters", "disabled", "set_active"]


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return compiled(model, "active_adapters()").active


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters of ``model`` (in place; a no-op for the weights)."""
    info = compiled(model, "set_active()")
    chosen = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in chosen if n not in info.spec.adapters]
    if unknown:
        raise CompileError(
            f"the model has no adapter {unknown[0]!r} (has: {', '.join(info.spec.adapters)})"
        )
    rebuild(model, chosen)
    info.active = chosen


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block: outputs equal the original model's."""
    info = compiled(model, "disabled()")
    previous = info.active
    rebuild(model, ())
    try:
        yield model
    finally:
        rebuild(model, previous)
