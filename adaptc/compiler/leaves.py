"""The functions the passes emit, kept as single nodes whenever code is traced again.

fx unpickles a graph module by tracing its generated code; a pass's function
(:func:`~adaptc.compiler.dropout.dropout_linear`, …) would be traced into there, and its
checks of the run time state (``torch.is_grad_enabled()``, a hook) would fail on proxies.
:class:`LeafFunctionTracer` autowraps every function in :data:`LEAF_FUNCTIONS` (each pass
module adds its own at import); the compiler's tracer and the regions' graphs use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import fx

__all__ = ["LEAF_FUNCTIONS", "LeafFunctionTracer", "leaf"]

LEAF_FUNCTIONS: list[Callable[..., Any]] = []


def leaf(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` as a function traced code keeps as a node (a decorator)."""
    LEAF_FUNCTIONS.append(fn)
    return fn


class LeafFunctionTracer(fx.Tracer):
    """A tracer that keeps the passes' functions as ``call_function`` nodes."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("autowrap_modules", (math,))
        kwargs.setdefault("autowrap_functions", tuple(LEAF_FUNCTIONS))
        super().__init__(**kwargs)
