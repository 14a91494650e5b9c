"""The method registry: every method's :class:`~adaptc.methods.base.Method`, by name."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import cache

from torch import nn

from adaptc.methods import NAMES
from adaptc.methods.base import Branch, Method

__all__ = ["UnknownMethodError", "branches_of", "method", "method_of", "methods"]


class UnknownMethodError(ValueError):
    """No registered method has this name."""


@cache
def methods() -> tuple[Method, ...]:
    """The registered methods, in :data:`adaptc.methods.NAMES` order."""
    found = []
    for name in NAMES:
        entry = importlib.import_module(f"adaptc.methods.{name}.method").METHOD
        assert isinstance(entry, Method) and entry.name == name, name
        found.append(entry)
    return tuple(found)


def method(name: str) -> Method:
    """The method called ``name`` (a spec's ``method``)."""
    for entry in methods():
        if entry.name == name:
            return entry
    raise UnknownMethodError(f"unknown adapter method {name!r} (known: {', '.join(NAMES)})")


def method_of(branch: Branch) -> Method:
    return method(branch.method)


def branches_of(layer: nn.Module, adapters: Sequence[str] | None = None) -> list[Branch]:
    """The branches hanging under ``layer``, in ``adapters`` order (all when None)."""
    found = {b.adapter: b for b in layer.children() if isinstance(b, Branch)}
    if adapters is None:
        return list(found.values())
    return [found[a] for a in adapters if a in found]
