"""Argument patterns met at run time: trace the forward again, or run it as Python.

A :class:`~adaptc.compiler.patterns.PatternGraphModule` called with a pattern it has no
graph for calls :func:`call_new_pattern` (outside dynamo). The trace runs the traced class's
own forward over a shallow copy holding the graph module's children, parameters and
buffers, as :func:`~adaptc.compiler.trace.frontier` traced the original, with the same
leaves. Where it fails (control flow on a tensor's value), :func:`run_untraced` runs that
forward as Python with every target layer in a one-layer graph, and a warning says so once.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
from torch import fx, nn

from adaptc.compiler.errors import AdaptcWarning
from adaptc.compiler.passes import add_pattern, insert_branches, options_of
from adaptc.compiler.patterns import (
    HOOKS,
    MAX_PATTERNS,
    Key,
    PatternGraphModule,
    Patterns,
    patterns_of,
)
from adaptc.compiler.saved import ModulesToSave
from adaptc.compiler.trace import trace_both_modes, wrap_leaf
from adaptc.methods.base import Branch
from adaptc.methods.registry import branches_of

__all__ = ["call_new_pattern", "retrace", "run_untraced"]


_WARNED: set[tuple[type, Key]] = set()


def call_new_pattern(gm: PatternGraphModule, key: Key, args: tuple[Any, ...]) -> Any:
    """Trace ``gm``'s forward for the new pattern ``key``, keep the graph, run the call.

    ``args`` are the call's arguments, one per parameter. Where the pattern does not trace,
    or the module has met :data:`MAX_PATTERNS` patterns, the forward runs as Python."""
    patterns = patterns_of(gm)
    assert patterns is not None
    if key not in patterns.graphs:
        if len(patterns.graphs) + 1 >= MAX_PATTERNS:
            _warn_once(patterns, key, f"it has been called with {MAX_PATTERNS} patterns")
            return run_untraced(gm, args)
        graph = retrace(gm, patterns, key)
        if graph is None:
            _warn_once(patterns, key, "torch.fx cannot trace its forward for these arguments")
        add_pattern(gm, key, graph)
    return type(gm)._adaptc_forwards[key](gm, *args)


def retrace(gm: PatternGraphModule, patterns: Patterns, key: Key) -> fx.Graph | None:
    """The base graph (no adapters) of ``gm``'s forward for ``key``, or None."""
    source = _as_traced(gm, patterns, dict(gm._modules))
    leaves = {id(m) for m in gm.modules() if m is not gm and _opaque(m)}
    for path in patterns.leaves:
        try:
            leaves.add(id(gm.get_submodule(path)))
        except AttributeError:
            continue
    graph = trace_both_modes(source, leaves, patterns.concrete_args(key))
    if graph is None:
        return None
    for node in graph.nodes:  # constants the trace kept on the copy (``_tensor_constant0``)
        name = str(node.target)
        if node.op == "get_attr" and not _has_attr(gm, name):
            if "." in name or name not in source.__dict__:
                return None
            value = source.__dict__[name]
            if isinstance(value, torch.Tensor):
                gm.register_buffer(name, value, persistent=False)
            else:
                setattr(gm, name, value)
    return graph


def run_untraced(gm: PatternGraphModule, args: tuple[Any, ...]) -> Any:
    """Run the traced class's own forward, as Python, on ``gm``'s children; each layer
    that carries branches is wrapped in a one-layer graph with the adapters ``gm``'s
    graphs carry. Built per call: it follows switches, merges and modes."""
    patterns = patterns_of(gm)
    assert patterns is not None
    active, site = patterns.emitted
    done: dict[int, nn.Module] = {}

    def wrapped(module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        result = module
        if branches_of(module):
            result = wrap_leaf(module, options=options_of(gm))
            insert_branches(result, active, site=site)
        elif not _opaque(module):
            children = {n: c if c is None else wrapped(c) for n, c in module._modules.items()}
            if any(children[n] is not c for n, c in module._modules.items()):
                result = object.__new__(type(module))  # a shallow copy with the wrappers
                result.__dict__.update(module.__dict__)
                result.__dict__["_modules"] = children
        done[id(module)] = result
        return result

    children = {n: c if c is None else wrapped(c) for n, c in gm._modules.items()}
    module = _as_traced(gm, patterns, children)
    positional, keywords = [], {}
    for param, value in zip(patterns.params, args, strict=True):
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            keywords[param.name] = value
        else:
            positional.append(value)
    return patterns.cls.forward(module, *positional, **keywords)


def _as_traced(gm: fx.GraphModule, patterns: Patterns, modules: dict[str, Any]) -> nn.Module:
    """An instance of the traced class over ``gm``'s parameters, buffers and ``modules``."""
    module: nn.Module = object.__new__(patterns.cls)
    nn.Module.__init__(module)
    module.__dict__.update({k: gm.__dict__.get(k, v) for k, v in patterns.attrs.items()})
    module.__dict__.update(
        _modules=modules,
        _parameters=dict(gm._parameters),
        _buffers=dict(gm._buffers),
        _non_persistent_buffers_set=set(gm._non_persistent_buffers_set),
        training=gm.training,
    )
    return module


def _opaque(module: nn.Module) -> bool:
    """Modules a new trace must not enter: targets, saved modules, graphs of their own."""
    return isinstance(module, (Branch, ModulesToSave, fx.GraphModule)) or bool(branches_of(module))


def _has_attr(module: nn.Module, path: str) -> bool:
    try:
        functools.reduce(getattr, path.split("."), module)
    except AttributeError:
        return False
    return True


def _warn_once(patterns: Patterns, key: Key, why: str) -> None:
    if (patterns.cls, key) in _WARNED:
        return
    _WARNED.add((patterns.cls, key))
    warnings.warn(
        f"{patterns.cls.__name__}({patterns.describe(key)}): {why}, so it runs as Python "
        "for them (the adapters apply; the speed of one graph is lost)",
        AdaptcWarning,
        stacklevel=2,
    )


HOOKS.new_pattern = call_new_pattern
HOOKS.untraced = run_untraced
