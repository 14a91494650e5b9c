"""Generated code, shared: graph modules with the same graph share one class and ``forward``.

``GraphModule.recompile`` generates Python source for the graph and ``exec``s it, once per
instance and per edit. A 7B model has 224 targets whose graphs are identical in all but
the instance (every ``q_proj`` wrapper, every MLP block), and switching adapters re-emits
every graph. :class:`CachedGraphModule` keys the code on the graph's structure (each
node's op, name, target, arguments and type) and reuses the class that already carries
that code's ``forward``: compile, switch and merge pay for code generation once per
distinct graph, not once per graph module.

A class in the cache is never recompiled (a miss always gets a fresh class), so graph
modules that share it cannot disturb each other. torch.compile guards on the class:
distinct code means a distinct class, and switching back to a graph reuses its class and
with it dynamo's cached compilation. :func:`forward_of` shares the ``forward`` of a graph
that no class carries (the other argument patterns of :mod:`adaptc.compiler.patterns`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import fx, nn
from torch.fx.graph import CodeGen
from torch.fx.graph_module import _forward_from_src

__all__ = ["CachedGraphModule", "code_key", "forward_of"]

_MAX = 4096  # distinct codes kept; beyond, the cache starts over
# (base class, class name, code key) -> (the class carrying forward, its PythonCode)
_CODE: dict[tuple[Any, ...], tuple[type[fx.GraphModule], Any]] = {}
_FORWARDS: dict[tuple[Any, ...], Callable[..., Any]] = {}  # code key -> forward (forward_of)


def code_key(graph: fx.Graph) -> tuple[Any, ...] | None:
    """What the generated code depends on, or None when it cannot be keyed safely."""
    if type(graph._codegen) is not CodeGen or getattr(graph, "_co_fields", None):
        return None
    key = []
    for n in graph.nodes:
        target = n.target if isinstance(n.target, str) else _hashable(n.target)
        if target is None:
            return None
        key.append((n.op, n.name, target, str(n.args), str(n.kwargs), str(n.type)))
    return tuple(key)


def _hashable(target: Any) -> Any:
    try:
        hash(target)
    except TypeError:
        return None
    return ("fn", target)


def _base(cls: type) -> type:
    return next(t for t in cls.__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")


class CachedGraphModule(fx.GraphModule):
    """A ``GraphModule`` whose ``recompile`` reuses the code of an identical graph."""

    def __deepcopy__(self, memo: dict[int, Any]) -> CachedGraphModule:
        """fx's copy, keeping adaptc's entries of ``__dict__`` (the compiled model's state,
        :mod:`adaptc.compiler.state`), which fx's copy drops."""
        new = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if key.startswith("_adaptc") and key not in new.__dict__:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new  # type: ignore[return-value]

    def _class_key(self) -> tuple[Any, ...] | None:
        """What the class carries: its base, its name and its graph's code (None: not keyed).
        A subclass whose class carries more adds it."""
        from torch.fx.experimental import _config as fx_config

        graph_key = None if fx_config.enrich_profiler_metadata else code_key(self._graph)
        if graph_key is None:
            return None
        return (_base(type(self)), type(self).__name__, graph_key)

    def _finish_class(self, cls: type[fx.GraphModule]) -> None:
        """Complete a fresh class that carries this graph's ``forward`` (for subclasses)."""

    def recompile(self) -> Any:
        key = self._class_key()
        if key is None:
            return self._recompile_unkeyed()
        hit = _CODE.get(key)
        if hit is not None:
            cached_cls, python_code = hit
            self._code = python_code.src
            self._lineno_map = python_code._lineno_map
            self._prologue_start = python_code._prologue_start
            self.__class__ = cached_cls  # type: ignore[assignment]
            return python_code
        # a fresh class: the instance's own may be shared with others through the cache
        python_code = self._recompile_fresh()
        if len(_CODE) >= _MAX:
            _CODE.clear()
        _CODE[key] = (type(self), python_code)
        return python_code

    def _recompile_unkeyed(self) -> Any:
        """Recompile a graph whose code cannot be keyed: as ``GraphModule`` does."""
        return super().recompile()

    def _recompile_fresh(self) -> Any:
        """Recompile onto a class of its own (never one shared through the cache)."""
        base = _base(type(self))
        fresh = type("GraphModuleImpl", (base,), {"__module__": type(self).__module__})
        fresh.__name__ = type(self).__name__
        self.__class__ = fresh
        python_code = super().recompile()
        # fx wraps each call in three frames that only rewrite an exception's message;
        # a graph module called hundreds of times per step pays for them on every call
        fresh.__call__ = nn.Module.__call__  # type: ignore[method-assign]
        self._finish_class(fresh)
        return python_code


def forward_of(graph: fx.Graph) -> Callable[..., Any]:
    """The generated ``forward(self, ...)`` of ``graph``, shared by identical graphs."""
    key = code_key(graph)
    hit = None if key is None else _FORWARDS.get(key)
    if hit is not None:
        return hit
    python_code = graph.python_code(root_module="self")
    fn: Callable[..., Any] = _forward_from_src(python_code.src, python_code.globals)
    if key is not None:
        if len(_FORWARDS) >= _MAX:
            _FORWARDS.clear()
        _FORWARDS[key] = fn
    return fn
