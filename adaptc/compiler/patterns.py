"""Argument patterns: a traced graph holds for the pattern of arguments it was traced with.

torch.fx runs ``forward`` once, with proxies for the arguments. Code that asks which
arguments were given or branches on a flag or a count sees one case only: a proxy is
never None (``if mask is not None:`` always multiplies), and it is neither a bool nor a
loop count (``if scale_out:``, ``range(n_steps)`` do not trace). So the *pattern-sensitive*
parameters of a forward — those whose default is None or a plain bool, int, float or str —
are traced with concrete values (fx ``concrete_args``), and a graph holds for one pattern::

    forward(x)                        # pattern (None, ("bool", False))
    forward(x, mask=m, scale_out=1)   # pattern ("value", ("int", 1)): another graph

A pattern says of each sensitive argument whether it is None, else its type and value when
it is plain; anything else (a tensor) is just a ``"value"``. A :class:`PatternGraphModule`
keeps the traced signature; its forward computes each call's pattern and runs the graph
traced for it. A new pattern is traced on its first call (the traced class's own forward
over the graph module's children) and kept, up to :data:`MAX_PATTERNS`; a pattern that
does not trace runs that forward as Python instead, each target layer in a graph of its
own, and warns once. Modules without sensitive parameters are plain graph modules: no
check, no cost.

Every pattern's graph carries the same adapters: the passes rebuild them all from their
base graphs (``Patterns.graphs``) with the adapter state they record (``Patterns.emitted``),
and the class of the module carries every pattern's code, so torch.compile, which guards
on the class, recompiles when a pattern is added or the adapters change. The first call
of a new pattern inside torch.compile is a graph break (the trace runs outside dynamo).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import PH

from adaptc.compiler.codecache import CachedGraphModule, code_key, forward_of

__all__ = [
    "HOOKS",
    "MAX_PATTERNS",
    "VALUE",
    "Hooks",
    "PatternGraphModule",
    "Patterns",
    "kind",
    "patterns_of",
    "sensitive_parameters",
    "set_patterns",
]

Key = tuple[Any, ...]
VALUE = "value"  # the pattern of an argument that is neither None nor plain (a tensor)
MAX_PATTERNS = 16  # graphs kept per module; further patterns run as Python
_PLAIN = (bool, int, float, str)
_EMPTY = inspect.Parameter.empty
_DERIVED = ("_graph", "_adaptc_others")  # rebuilt from the base graphs, never copied


def kind(value: Any) -> Any:
    """The pattern of one argument: None, ``(type name, value)`` when plain, else VALUE."""
    if value is None:
        return None
    cls = type(value)
    if cls in _PLAIN:
        return (cls.__name__, value)
    return VALUE


def sensitive_parameters(params: tuple[inspect.Parameter, ...]) -> tuple[str, ...]:
    """The parameters whose pattern a trace fixes: a default of None or a plain value."""
    return tuple(
        p.name
        for p in params
        if p.default is not _EMPTY and (p.default is None or type(p.default) in _PLAIN)
    )


@dataclass(frozen=True, eq=False)
class Patterns:
    """What a graph module's graphs assume about its arguments, and how to trace another.

    Kept in ``meta["adaptc"]["patterns"]`` and replaced, never changed, on every update
    (:func:`set_patterns`): copies of a compiled model share their ``meta``.
    """

    cls: type[nn.Module]  # the traced class: a new pattern runs its forward
    attrs: dict[str, Any]  # the traced module's own attributes (plain values, configs)
    params: tuple[inspect.Parameter, ...]  # its forward's parameters, without ``self``
    sensitive: tuple[str, ...]  # the parameters a pattern describes, in order
    leaves: tuple[str, ...]  # paths of the modules the tracer does not enter (targets)
    main: Key  # the pattern of the module's own graph (``meta["adaptc"]["base_graph"]``)
    # every other pattern met: its graph without adapters, or None where it does not trace
    graphs: dict[Key, fx.Graph | None] = field(default_factory=dict)
    # (active adapters, the site emitter or None) that all graphs were emitted with
    emitted: tuple[tuple[str, ...], Any] = ((), None)

    def concrete_args(self, key: Key) -> dict[str, Any]:
        """fx ``concrete_args`` that trace ``key``: values fixed, a placeholder for VALUE."""
        pairs = zip(self.sensitive, key, strict=True)
        return {n: PH if k == VALUE else _value(k) for n, k in pairs}

    def describe(self, key: Key) -> str:
        """``mask=<value>, scale_out=True``: a pattern as a reader sees it."""
        parts = (
            f"{n}={'<value>' if k == VALUE else repr(_value(k))}"
            for n, k in zip(self.sensitive, key, strict=True)
        )
        return ", ".join(parts)


def _value(k: Any) -> Any:
    return None if k is None else k[1]


def patterns_of(gm: nn.Module) -> Patterns | None:
    """The argument patterns of a compiler graph module (None: its forward has none)."""
    found = getattr(gm, "meta", {}).get("adaptc", {}).get("patterns")
    return found if isinstance(found, Patterns) else None


def set_patterns(gm: fx.GraphModule, patterns: Patterns) -> None:
    """Record ``patterns`` on ``gm`` alone (its ``meta`` may be shared with copies)."""
    gm.meta = {**gm.meta, "adaptc": {**gm.meta["adaptc"], "patterns": patterns}}


@dataclass
class Hooks:
    """What a pattern graph module calls in the modules that build it (which import this
    one): set when they are imported (:mod:`adaptc.compiler.passes`, ``retrace``)."""

    rebuild: Callable[[PatternGraphModule], None] | None = None  # re-emit every graph
    new_pattern: Callable[[PatternGraphModule, Key, tuple[Any, ...]], Any] | None = None
    untraced: Callable[[PatternGraphModule, tuple[Any, ...]], Any] | None = None


HOOKS = Hooks()


class PatternGraphModule(CachedGraphModule):
    """A traced module whose forward runs the graph of each call's argument pattern.

    Its own graph (``graph``, ``code``) is the main pattern's; the others' graphs, with the
    same adapters, are set with :meth:`set_graphs`. Its class carries them all: a mapping
    from pattern to generated forward, and a ``forward`` with the traced signature that
    checks the pattern, for example::

        def forward(self, x, mask=None):
            key = (kind(mask),)
            fn = self._adaptc_forwards.get(key)
            if fn is None:
                return new_pattern(self, key, (x, mask))    # trace it (outside dynamo)
            return fn(self, x, mask)
    """

    _adaptc_forwards: dict[Key, Callable[..., Any]]

    def set_graphs(self, main: fx.Graph, others: dict[Key, fx.Graph | None]) -> None:
        """Install the main pattern's graph and the other patterns' (None: runs as Python)."""
        self.__dict__["_adaptc_others"] = others
        self.graph = main  # the setter recompiles: one class for all of them

    @property
    def pattern_graphs(self) -> dict[Key, fx.Graph | None]:
        """The graphs of the patterns other than the main one, as they run now."""
        others: dict[Key, fx.Graph | None] = self.__dict__.get("_adaptc_others", {})
        return others

    def _class_key(self) -> tuple[Any, ...] | None:
        key = super()._class_key()
        patterns = patterns_of(self)
        if key is None or patterns is None:
            return key
        codes = []
        for k, graph in self.pattern_graphs.items():
            code = "untraced" if graph is None else code_key(graph)
            if code is None:
                return None
            codes.append((k, code))
        return (*key, _hashable(patterns.params), patterns.sensitive, patterns.main, tuple(codes))

    def _recompile_unkeyed(self) -> Any:
        if patterns_of(self) is None:
            return super()._recompile_unkeyed()
        return self._recompile_fresh()

    def _finish_class(self, cls: type[fx.GraphModule]) -> None:
        patterns = patterns_of(self)
        if patterns is None:  # still being built: the guard comes with the patterns
            return
        new_pattern, untraced = _disabled()
        forwards: dict[Key, Callable[..., Any]] = {patterns.main: cls.forward}
        for k, graph in self.pattern_graphs.items():
            forwards[k] = untraced if graph is None else forward_of(graph)
        cls._adaptc_forwards = forwards  # type: ignore[attr-defined]
        cls.forward = _guard(patterns.params, patterns.sensitive, new_pattern)

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k not in _DERIVED}
        return (_restore, (_base_class(type(self)), type(self).__name__, state))

    def __deepcopy__(self, memo: dict[int, Any]) -> PatternGraphModule:
        new = object.__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in _DERIVED}
        new.__dict__.update(copy.deepcopy(state, memo))
        _rebuild(new)
        return new


def _restore(base: type[PatternGraphModule], name: str, state: dict[str, Any]) -> nn.Module:
    cls = type("GraphModuleImpl", (base,), {"__module__": base.__module__})
    cls.__name__ = name
    gm: PatternGraphModule = object.__new__(cls)
    gm.__dict__.update(state)
    _rebuild(gm)
    return gm


def _rebuild(gm: PatternGraphModule) -> None:
    """Emit every graph again from the base graphs (after a copy or unpickling)."""
    assert HOOKS.rebuild is not None, "adaptc.compiler.passes sets it on import"
    HOOKS.rebuild(gm)


def _base_class(cls: type) -> type:
    return next(t for t in cls.__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:  # an unhashable default (a list): this signature's own classes
        return ("id", id(value))
    return value


def _guard(
    params: tuple[inspect.Parameter, ...],
    sensitive: tuple[str, ...],
    new_pattern: Callable[..., Any],
) -> Callable[..., Any]:
    """A ``forward`` with the signature ``params`` that dispatches on the pattern."""
    parts: list[str] = []
    kinds = [p.kind for p in params]
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.KEYWORD_ONLY and (
            i == 0 or kinds[i - 1] is not inspect.Parameter.KEYWORD_ONLY
        ):
            parts.append("*")
        parts.append(p.name)
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and (
            i + 1 == len(params) or kinds[i + 1] is not inspect.Parameter.POSITIONAL_ONLY
        ):
            parts.append("/")
    names = ", ".join(p.name for p in params)
    key = "".join(f"_adaptc_kind({n}), " for n in sensitive)
    src = (
        f"def forward(self, {', '.join(parts)}):\n"
        f"    _adaptc_key = ({key})\n"
        "    _adaptc_fn = self._adaptc_forwards.get(_adaptc_key)\n"
        "    if _adaptc_fn is None:\n"
        f"        return _adaptc_new_pattern(self, _adaptc_key, ({names},))\n"
        f"    return _adaptc_fn(self, {names})\n"
    )
    namespace: dict[str, Any] = {"_adaptc_kind": kind, "_adaptc_new_pattern": new_pattern}
    exec(compile(src, "<adaptc: argument pattern>", "exec"), namespace)
    fn: Callable[..., Any] = namespace["forward"]
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    fn.__defaults__ = tuple(p.default for p in positional if p.default is not _EMPTY) or None
    fn.__kwdefaults__ = {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not _EMPTY
    } or None
    return fn


@functools.cache
def _disabled() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The slow paths, which dynamo must run rather than trace (made on first use:
    ``torch.compiler.disable`` imports dynamo)."""
    disable = torch.compiler.disable
    return disable(_new_pattern), disable(_untraced)  # type: ignore[no-untyped-call]


def _new_pattern(gm: PatternGraphModule, key: Key, args: tuple[Any, ...]) -> Any:
    assert HOOKS.new_pattern is not None, "adaptc.compiler.retrace sets it on import"
    return HOOKS.new_pattern(gm, key, args)


def _untraced(gm: PatternGraphModule, *args: Any) -> Any:
    assert HOOKS.untraced is not None, "adaptc.compiler.retrace sets it on import"
    return HOOKS.untraced(gm, args)
