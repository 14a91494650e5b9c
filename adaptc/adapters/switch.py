"""Choosing the active adapters of a compiled model, and running the base model alone.

Switching rebuilds each adapted graph from its base graph with the branches of the chosen
adapters (no branch nodes at all for none), and points ``modules_to_save`` wrappers at the
chosen adapter's copy (or the frozen original). Adapter weights are not touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from adaptc.compiler import AdaptcWarning, CompileError, compiled, rebuild
from adaptc.compiler.inplace import unmerge_in_place, unmerged
from adaptc.compiler.saved import ModulesToSave

__all__ = ["active_adapters", "disabled", "set_active", "set_enabled"]


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
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            saving = [n for n in chosen if n in module.modules_to_save]
            if len(saving) > 1:
                raise CompileError(
                    f"adapters {saving[0]!r} and {saving[1]!r} both save a copy of the same "
                    "module (modules_to_save): only one of them can be active at a time"
                )
    if info.merged is not None and chosen != info.active:
        warnings.warn(
            "Adapter cannot be set when the model is merged. Unmerging the model first.",
            AdaptcWarning,
            stacklevel=2,
        )
        unmerge_in_place(model)
    rebuild(model, chosen)
    info.active = chosen


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Run the active adapters (True) or the base model alone (False) from now on; the
    active adapters stay chosen meanwhile. Disabling unmerges adapters merged in place
    (exactly), as PEFT does."""
    info = compiled(model, "set_enabled()")
    if not enabled and info.merged is not None:
        unmerge_in_place(model)
    info.disabled = not enabled
    rebuild(model, info.active)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block: outputs equal the original model's (also
    when adapters are merged in place: the original weights are used inside, the merged
    ones again after; and in a mixed batch: disabling wins)."""
    info = compiled(model, "disabled()")
    if info.disabled:  # nested: the outer block restores
        yield model
        return
    with unmerged(model):
        info.disabled = True
        rebuild(model, info.active)
        try:
            yield model
        finally:
            info.disabled = False
            rebuild(model, info.active)  # as chosen meanwhile (set_active inside the block)
