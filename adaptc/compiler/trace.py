"""The traceable frontier: the largest subtrees that torch.fx traces and that hold targets.

``symbolic_trace`` fails on whole transformers models but works on custom models and on
the small modules inside HF models (MLP blocks, linear layers). :func:`frontier` tries a
module; if it does not trace, it recurses into the children that contain targets. A
target that no ancestor can trace becomes its own small graph, :class:`AdaptedLayer`, with
the layer as ``base_layer`` (PEFT's name), so every target ends up as a ``call_module``
node in some graph. Traced subtrees keep their children, parameters, buffers and plain
attributes, so the parents' code that reads them keeps working.

A forward with optional or plain arguments (``mask=None``, ``scale_out: bool = False``) is
traced for the pattern of its defaults; :mod:`adaptc.compiler.patterns` checks each call's
pattern and traces another on its first call (:mod:`adaptc.compiler.retrace`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import PH, _assert_is_none

from adaptc.compiler.codecache import CachedGraphModule
from adaptc.compiler.leaves import LeafFunctionTracer
from adaptc.compiler.passes import emit_branches
from adaptc.compiler.patterns import PatternGraphModule, Patterns, kind, sensitive_parameters
from adaptc.layers import find_kind
from adaptc.spec.compile_options import CompileOptions

__all__ = ["AdaptedLayer", "frontier", "is_adapted_graph"]

# Names a GraphModule uses itself: never copied over from the traced module.
_RESERVED = {"graph", "code", "training", "meta", "forward", "_graph", "_code"}


class AdaptedLayer(CachedGraphModule):
    """A single target layer in a graph of its own; attributes fall back to ``base_layer``."""

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("_modules", {})
        if name in modules:  # the forward reads self.base_layer on every call: no detour
            return modules[name]
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base_layer" in modules and name not in ("base_layer",):
                return getattr(modules["base_layer"], name)
            raise


def is_adapted_graph(module: nn.Module) -> bool:
    """True for a graph module made by the compiler (``meta["adaptc"]`` holds its base graph)."""
    return isinstance(module, fx.GraphModule) and "adaptc" in getattr(module, "meta", {})


class _LeafTracer(LeafFunctionTracer):
    def __init__(self, leaves: set[int] | None = None) -> None:  # no args when unpickling
        super().__init__()
        self.leaves = leaves or set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.leaves or super().is_leaf_module(m, module_qualified_name):
            return True
        found = find_kind(m)  # a quantized layer runs as its backend's module: never entered
        return found is not None and found.quantized


def frontier(
    root: nn.Module,
    holds_target: Callable[[nn.Module], bool],
    targets: set[int],
    opaque: set[int] = frozenset(),  # type: ignore[assignment]
    active: Sequence[str] = (),
    options: CompileOptions | None = None,
) -> nn.Module:
    """Replace the subtrees of ``root`` that hold targets with graph modules (in place).

    ``holds_target(m)`` says whether ``m`` is or contains a target; ``targets`` are the ids
    of the target layers, ``opaque`` those of other modules the tracer must not enter
    (modules_to_save wrappers). Each graph gets the branches of the ``active`` adapters
    and the training passes of ``options`` (kept in ``meta["adaptc"]["options"]``).
    Returns the new root, which is ``root`` itself unless the whole model traced.
    """
    leaves = targets | opaque
    done: dict[int, nn.Module] = {}
    traces: _Traces = {}  # structure -> a pristine graph, and the arguments it fixed

    def visit(module: nn.Module) -> nn.Module:
        if id(module) in done:  # a module shared by several parents is rewritten once
            return done[id(module)]
        if is_adapted_graph(module):  # built already (a host of targeted parameters)
            result: nn.Module = module
        elif id(module) in targets:
            result = wrap_leaf(module, active, options)
        else:
            traced = _try_trace(module, leaves, active, traces, options)
            if traced is not None:
                result = traced
            else:
                for name, child in module._modules.items():
                    if child is not None and holds_target(child):
                        module._modules[name] = visit(child)
                if hasattr(module, "gradient_checkpointing"):
                    module.register_forward_pre_hook(_checkpointed_input_requires_grad)
                result = module
        done[id(module)] = result
        return result

    return visit(root) if holds_target(root) else root


def drop_checkpoint_hooks(model: nn.Module) -> None:
    """Remove the compiler's checkpointing pre-hooks (a merged model has no adapter to feed)."""
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, fn in hooks.items() if fn is _checkpointed_input_requires_grad]:
            del hooks[key]


def _checkpointed_input_requires_grad(module: nn.Module, args: tuple[Any, ...]) -> Any:
    """Let gradients reach the adapters inside a block that checkpoints itself.

    Reentrant checkpointing (``use_reentrant=True``) gives a block's output a gradient only
    when one of its inputs requires grad; with frozen input embeddings none does, so the
    adapters in the block get no gradient ("element 0 of tensors does not require grad").
    PEFT makes the embeddings' output require grad; here each adapted block that
    checkpoints makes its hidden-state input a leaf that requires grad, whichever way
    checkpointing was enabled (before or after compiling). The caller's tensor is not
    changed (a detached view is used).
    """
    if not (getattr(module, "gradient_checkpointing", False) and module.training):
        return None
    x = args[0] if args else None
    if (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and not x.requires_grad
        and torch.is_grad_enabled()
    ):
        return (x.detach().requires_grad_(), *args[1:])
    return None


def _try_trace(
    module: nn.Module,
    leaves: set[int],
    active: Sequence[str],
    traces: _Traces,
    options: CompileOptions | None = None,
) -> fx.GraphModule | None:
    """A graph module for ``module``, or None when it cannot be traced faithfully.

    ``traces`` remembers the graph of each module *structure* (see :func:`_structure`):
    the 32 identical MLP blocks of a 7B model are traced once, not 32 times.
    """
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or not _plain_signature(module):
        return None
    if hasattr(module, "gradient_checkpointing"):  # tracing would freeze (and drop) checkpointing
        return None
    key = _structure(module, leaves)
    if key is not None and key in traces:
        graph, fixed = traces[key]
        if graph is not None:
            graph = copy.deepcopy(graph)  # emitting branches edits it
    else:
        graph, fixed = _trace_fixing_what_it_must(module, leaves)
        if key is not None:
            traces[key] = (None if graph is None else copy.deepcopy(graph), fixed)
    if graph is None:
        return None
    patterns = None  # ``fixed``: traced with these values, the main pattern
    if fixed:
        params = _parameters(type(module)) or ()  # type: ignore[arg-type]
        patterns = Patterns(
            cls=type(module),
            attrs={k: v for k, v in module.__dict__.items() if k not in _INTERNALS},
            params=tuple(p.replace(annotation=inspect.Parameter.empty) for p in params),
            sensitive=tuple(fixed),
            leaves=tuple(p for p, m in module.named_modules() if id(m) in leaves),
            main=tuple(kind(value) for value in fixed.values()),
            emitted=(tuple(active), None),
        )
    return _graph_module(
        module, graph, type(module).__name__, active=active, patterns=patterns, options=options
    )


def _trace_fixing_what_it_must(
    module: nn.Module, leaves: set[int]
) -> tuple[fx.Graph | None, dict[str, Any]]:
    """The graph of ``module`` and the arguments fixed to their defaults for it.

    An int or float argument stays a graph input when the code only computes with it
    (``x * scale``, ``x[:, :n]``): fx raises on any Python decision about a proxy
    (``if n > 1``, ``range(n)``), so a trace that succeeds holds for every value. Only
    when it fails are numbers fixed too, like None defaults, flags and strings.
    """
    fixed = _fixed_defaults(type(module))
    numbers = {k for k, v in fixed.items() if type(v) in (int, float)}
    if numbers:
        rest = {k: v for k, v in fixed.items() if k not in numbers}
        graph = trace_both_modes(module, leaves, rest)
        if graph is not None:
            return graph, rest
    return trace_both_modes(module, leaves, fixed), fixed


# what frontier remembers of each module structure: its graph (None: untraceable) and
# the arguments that graph fixed
_Traces = dict[tuple[Any, ...], tuple[fx.Graph | None, dict[str, Any]]]


def trace_both_modes(
    module: nn.Module, leaves: set[int], concrete: dict[str, Any] | None = None
) -> fx.Graph | None:
    """The eval-mode graph, when tracing works and both modes give the same graph.

    ``concrete`` fixes arguments (fx ``concrete_args``; ``fx.PH`` keeps a placeholder); by
    default the pattern-sensitive ones are fixed to their defaults."""
    if concrete is None:
        concrete = _fixed_defaults(type(module))
    modes = [(m, m.training) for m in module.modules()]
    try:
        graphs = []
        for mode in (True, False):  # code that branches on self.training must not be frozen
            module.train(mode)
            graph = _LeafTracer(leaves).trace(module, concrete_args=concrete or None)
            if concrete:
                _unspecialise_signature(graph, type(module), concrete)
            graphs.append(graph)
    except Exception:  # torch.fx raises many kinds of errors on untraceable code
        return None
    finally:
        for m, mode in modes:  # each as it was (a child may be in another mode)
            m.training = mode
    if _fingerprint(graphs[0]) != _fingerprint(graphs[1]):
        return None
    for node in graphs[1].nodes:  # string annotations (`from __future__ import annotations`)
        if isinstance(node.type, str):  # would break pickling of the generated code
            node.type = None
    return graphs[1]


def _fixed_defaults(cls: type) -> dict[str, Any]:
    """The pattern-sensitive parameters of ``cls.forward`` with their defaults."""
    params = _parameters(cls) or ()
    sensitive = sensitive_parameters(params)
    return {p.name: p.default for p in params if p.name in sensitive}


def _unspecialise_signature(graph: fx.Graph, cls: type, concrete: dict[str, Any]) -> None:
    """Give the traced forward its signature back. fx names a fixed argument's placeholder
    ``mask_1`` and asserts its value; the pattern check replaces the assertions."""
    params = _parameters(cls) or ()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, param in zip(placeholders, params, strict=True):
        if param.name not in concrete:
            continue
        node.target = param.name  # the generated code's parameter
        node._rename(param.name)  # fx's ``mask_1`` (a new name where that one is taken)
        if concrete[param.name] is PH:
            continue
        for check in list(node.users):  # _assert_is_none(mask_1), or _assert(flag_1 == True)
            asserts = list(check.users)
            if check.target is operator.eq and all(a.target is torch._assert for a in asserts):
                for a in asserts:
                    graph.erase_node(a)
            elif check.target is not _assert_is_none:
                raise ValueError(f"unexpected use of a fixed argument: {check.format_node()}")
            graph.erase_node(check)


# nn.Module's own bookkeeping: never part of what a forward computes (hooks are checked)
_INTERNALS = frozenset(
    {
        "training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules",
        "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook", "_forward_hooks",
        "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    }
)  # fmt: skip
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_PLAIN = (int, float, str, bool, type(None))


def _structure(module: nn.Module, leaves: set[int]) -> tuple[Any, ...] | None:
    """A key under which two modules trace to the same graph, or None when unsure.

    Same class, same mode, the same plain attribute values (other attributes: the same
    objects, e.g. one shared config), the same parameter and buffer names, no hooks, and
    children alike, recursively (targets and other leaves by position and class).
    """
    if any(getattr(module, h, None) for h in _HOOKS):
        return None
    attrs: list[tuple[Any, ...]] = []
    for name, value in module.__dict__.items():
        if name in _INTERNALS:
            continue
        if isinstance(value, _PLAIN):
            attrs.append((name, type(value), value))
        else:
            attrs.append((name, id(value)))
    children: list[tuple[Any, ...]] = []
    for name, child in module._modules.items():
        if child is None or id(child) in leaves:
            children.append((name, type(child)))
            continue
        sub = _structure(child, leaves)
        if sub is None:
            return None
        children.append((name, sub))
    return (
        type(module),
        module.training,
        tuple(attrs),
        tuple(children),
        tuple(module._parameters),
        tuple(module._buffers),
    )


def _fingerprint(graph: fx.Graph) -> list[tuple[str, str, str, str]]:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def _plain_signature(module: nn.Module) -> bool:
    params = _parameters(type(module))  # type: ignore[arg-type]
    if params is None:
        return False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return not any(p.kind in variadic for p in params)


@functools.cache
def _parameters(cls: Any) -> tuple[inspect.Parameter, ...] | None:
    """The parameters of ``cls.forward`` without ``self`` (per class: inspect is slow)."""
    try:
        params = tuple(inspect.signature(cls.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[1:]


def _graph_module(
    module: nn.Module,
    graph: fx.Graph,
    class_name: str,
    cls: type[fx.GraphModule] = CachedGraphModule,
    active: Sequence[str] = (),
    patterns: Patterns | None = None,
    options: CompileOptions | None = None,
) -> fx.GraphModule:
    if patterns is not None:
        cls = PatternGraphModule
    if graph._tracer_cls is None:  # built by hand (a leaf's wrapper): unpickling traces it
        graph._tracer_cls = LeafFunctionTracer
    base = copy.deepcopy(graph)
    if active:  # emit the branches before the module is built: its code is generated once
        emit_branches(graph, module, active, options=options)
    gm = cls(module, graph, class_name=class_name)
    # GraphModule copies only what the graph touches, and fills paths with plain Modules:
    # put back the real children (ModuleList stays a ModuleList) and everything else.
    for name, child in module._modules.items():
        gm._modules[name] = child
    for name, p in module._parameters.items():
        if name not in gm._parameters and p is not None:
            gm.register_parameter(name, p)
    for name, b in module._buffers.items():
        if name not in gm._buffers and b is not None:
            persistent = name not in module._non_persistent_buffers_set
            gm.register_buffer(name, b, persistent=persistent)
    for name, value in module.__dict__.items():
        if not name.startswith("_") and name not in _RESERVED and name not in gm.__dict__:
            gm.__dict__[name] = value
    gm.train(module.training)
    # the graph without adapters, kept to re-emit branches (switching) and for merge;
    # GraphModule.meta survives deepcopy, unlike ad-hoc attributes
    gm.meta["adaptc"] = {"base_graph": base, "source": type(module).__name__, "options": options}
    if patterns is not None:
        gm.meta["adaptc"]["patterns"] = patterns
        gm.recompile()  # a class with the pattern check
    return gm


def wrap_leaf(
    layer: nn.Module, active: Sequence[str] = (), options: CompileOptions | None = None
) -> fx.GraphModule:
    holder = nn.Module()
    holder.base_layer = layer
    holder.train(layer.training)
    graph = fx.Graph()
    inputs = [graph.placeholder(name, default_value=default) for name, default in _inputs(layer)]
    graph.output(graph.call_module("base_layer", tuple(inputs)))
    name = f"Adapted{type(layer).__name__}"
    return _graph_module(holder, graph, name, cls=AdaptedLayer, active=active, options=options)


_NO_DEFAULT = inspect.Signature.empty
_SIMPLE = (type(None), bool, int, float, str)


def _inputs(layer: nn.Module) -> list[tuple[str, Any]]:
    """The wrapper's parameters: the layer's own where they are plain (a subclass such as
    OPT's positional embedding takes more than one argument; the branch reads the first),
    else one input."""
    params = _parameters(type(layer))  # type: ignore[arg-type]
    if not params:
        return [("input", _NO_DEFAULT)]
    first = (params[0].name, _NO_DEFAULT)
    plain = all(
        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        and (p.default is _NO_DEFAULT or isinstance(p.default, _SIMPLE))
        for p in params
    )
    if not plain or params[0].default is not _NO_DEFAULT:
        return [first]
    return [first, *((p.name, p.default) for p in params[1:])]
