"""Passes over the compiler's graph modules: insert the adapters' branches, merge them away.

Each adapted graph module keeps its base graph (no adapter nodes) in
``meta["adaptc"]["base_graph"]``; both passes start from it, so switching adapters or
merging never accumulates edits. New nodes are tagged in ``node.meta["adaptc"]``. A graph
module traced per argument pattern (:mod:`adaptc.compiler.patterns`) has one base graph
per pattern; the passes rebuild them all alike and record the adapters they carry.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn

from adaptc.compiler.codecache import CachedGraphModule
from adaptc.compiler.patterns import HOOKS, Key, PatternGraphModule, patterns_of, set_patterns
from adaptc.compiler.saved import ModulesToSave
from adaptc.compiler.training import drop_regions, optimise
from adaptc.layers import kind_of
from adaptc.methods.base import Branch
from adaptc.methods.registry import branches_of, method_of
from adaptc.spec.compile_options import CompileOptions

__all__ = [
    "MERGED",
    "MergeError",
    "QuantizedMerge",
    "SiteEmitter",
    "add_pattern",
    "insert_branches",
    "merge_graph",
    "target_nodes",
]

# the key (in a target layer's __dict__) of the adapters merged in place into its weights
# (adaptc.compiler.inplace): such a layer runs no branch, as PEFT's merged layers
MERGED = "_adaptc_merged"

# site(graph, x, call, layer path, layer) -> the node holding the layer's new output: one
# node per target call instead of one branch per adapter (a mixed batch's form)
SiteEmitter = Callable[[fx.Graph, fx.Node, fx.Node, str, nn.Module], fx.Node]


class MergeError(ValueError):
    """A merged weight is not finite (safe merge)."""


def target_nodes(
    lookup: fx.GraphModule | Callable[[str], nn.Module], graph: fx.Graph
) -> Iterator[tuple[fx.Node, nn.Module]]:
    """``call_module`` nodes of ``graph`` whose module carries adapter branches.

    ``lookup`` is the graph's module (or its ``get_submodule``)."""
    get = lookup.get_submodule if isinstance(lookup, nn.Module) else lookup
    for node in list(graph.nodes):
        if node.op == "call_module":
            module = get(str(node.target))
            if branches_of(module):
                yield node, module


def insert_branches(
    gm: fx.GraphModule, active: Sequence[str], *, site: SiteEmitter | None = None
) -> int:
    """Rebuild ``gm``'s graph from its base graph with the branches of ``active`` adapters.

    Before (a traced MLP whose ``fc`` is a target)::

        def forward(self, x):
            fc = self.fc(x);  x = None
            relu = torch.relu(fc);  fc = None
            return relu

    After, with adapter ``default`` (r 8, lora_alpha 12)::

        def forward(self, x):
            fc = self.fc(x)
            fc_lora_default_lora_a = self.fc.lora_default.lora_A(x);  x = None
            fc_lora_default_lora_b = self.fc.lora_default.lora_B(fc_lora_default_lora_a)
            mul = fc_lora_default_lora_b * 1.5
            add = fc + mul;  fc = mul = None
            relu = torch.relu(add);  add = None
            return relu

    With ``site``, each target call gets the node(s) ``site`` emits instead (a mixed
    batch's one node per call, :mod:`adaptc.adapters.mixed`). The graphs of the module's other
    argument patterns are rebuilt alike, and each goes through the training passes of
    the module's compile options (``meta["adaptc"]["options"]``). Returns the number of
    branch sites emitted in the main graph (a layer called twice counts twice).
    """
    graph = copy.deepcopy(gm.meta["adaptc"]["base_graph"])
    drop_regions(gm)  # the earlier graphs' (rematerialised regions are re-made below)
    sites = emit_branches(graph, gm, active, site=site, options=options_of(gm))
    patterns = patterns_of(gm)
    if patterns is None:
        set_graph(gm, graph)
        return sites
    assert isinstance(gm, PatternGraphModule)
    others = {
        key: None if base is None else _emitted(gm, base, active, site)
        for key, base in patterns.graphs.items()
    }
    set_patterns(gm, dataclasses.replace(patterns, emitted=(tuple(active), site)))
    gm.set_graphs(graph, others)
    return sites


def add_pattern(gm: PatternGraphModule, key: Key, base: fx.Graph | None) -> None:
    """Add the graph of a new argument pattern (None: it runs as Python), with the
    adapters the module's other graphs carry."""
    patterns = patterns_of(gm)
    assert patterns is not None and key not in patterns.graphs and key != patterns.main
    active, site = patterns.emitted
    emitted = None if base is None else _emitted(gm, base, active, site)
    set_patterns(gm, dataclasses.replace(patterns, graphs={**patterns.graphs, key: base}))
    gm.set_graphs(gm.graph, {**gm.pattern_graphs, key: emitted})


def _emitted(
    gm: fx.GraphModule, base: fx.Graph, active: Sequence[str], site: SiteEmitter | None
) -> fx.Graph:
    graph = copy.deepcopy(base)
    emit_branches(graph, gm, active, site=site, options=options_of(gm))
    return graph


def options_of(gm: fx.GraphModule) -> CompileOptions | None:
    """The compile options ``gm``'s graphs are built with (None: no training passes)."""
    options = gm.meta.get("adaptc", {}).get("options")
    return options if isinstance(options, CompileOptions) else None


def emit_branches(
    graph: fx.Graph,
    owner: nn.Module,
    active: Sequence[str],
    *,
    site: SiteEmitter | None = None,
    options: CompileOptions | None = None,
) -> int:
    """Emit the branches of ``active`` adapters into ``graph`` (in place); lint it.

    Each branch is emitted by its method, in ``active`` order, on the output so far.
    ``owner`` is the module whose children the graph calls. With ``options``, the
    training passes (:mod:`adaptc.compiler.training`) then run over the graph (not on a
    mixed batch's ``site`` graphs); a rematerialised region is registered on ``owner``."""
    sites = _emit(graph, owner.get_submodule, active, site=site)
    if options is not None and site is None and sites:
        optimise(graph, owner, options)
    graph.lint()  # once, after every rewrite
    return sites


def _emit(
    graph: fx.Graph,
    lookup: Callable[[str], nn.Module],
    active: Sequence[str],
    *,
    site: SiteEmitter | None = None,
) -> int:
    sites = 0
    for node, layer in target_nodes(lookup, graph):
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        assert isinstance(x, fx.Node)
        if site is not None:
            out = site(graph, x, node, str(node.target), layer)
            node.replace_all_uses_with(out, delete_user_cb=_outside({out}))
            sites += 1
            continue
        if MERGED in layer.__dict__:  # adapters merged into its weights: it runs alone
            continue
        kind = kind_of(layer, str(node.target))
        current = node
        for branch in branches_of(layer, active):
            entry = method_of(branch)
            before = set(graph.nodes)
            out = entry.emit(
                graph,
                node,
                x,
                current,
                kind=kind,
                base=layer,
                branch=branch,
                branch_path=f"{node.target}.{entry.child_name(branch.adapter)}",
            )
            new = set(graph.nodes) - before
            for n in new:
                n.meta["adaptc"] = {"adapter": branch.adapter, "target": branch.target}
            if out is not current:
                current.replace_all_uses_with(out, delete_user_cb=_outside(new))
                current = out
            sites += 1
    return sites


# graph module -> {forward code: the class that carries it}; see set_graph
_CLASSES: weakref.WeakKeyDictionary[fx.GraphModule, dict[str, type[fx.GraphModule]]] = (
    weakref.WeakKeyDictionary()
)


def set_graph(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Give ``gm`` a new graph, on a class that carries that graph's ``forward``.

    fx keeps the generated ``forward`` on a class of the instance's own, and torch.compile
    guards on that class, not on its ``forward``: rewriting the code in place would let a
    compiled model keep running the old graph after switching adapters. So each distinct
    code gets its own class; switching back reuses the earlier class, and with it
    dynamo's cached compilation. The compiler's graph modules
    (:class:`~adaptc.compiler.codecache.CachedGraphModule`) share those classes across
    instances with identical graphs; any other graph module gets classes of its own.
    """
    if isinstance(gm, CachedGraphModule):
        gm.graph = graph  # the setter recompiles: a cached class, or a fresh one
        return
    code = graph.python_code(root_module="self").src
    classes = _CLASSES.setdefault(gm, {})
    cls = classes.get(code)
    if cls is None:
        old = type(gm)
        base = next(t for t in old.__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")
        cls = type("GraphModuleImpl", (base,), {"__module__": old.__module__})
        cls.__name__ = old.__name__  # the traced class's name, which GraphModule gave it
        classes[code] = cls
    gm.__class__ = cls
    gm.graph = graph  # the setter recompiles: forward is (re)installed on ``cls``


def _outside(nodes: set[fx.Node]) -> Callable[[fx.Node], bool]:
    return lambda user: user not in nodes


@torch.no_grad()
def merge_graph(
    gm: fx.GraphModule,
    adapters: Sequence[str],
    *,
    safe: bool = True,
    quantized: QuantizedMerge | None = None,
) -> None:
    """Fold ``adapters`` into new base weights and drop every branch from ``gm``.

    The layers that carried branches are replaced by copies holding ``W + s·ΔW`` (new
    tensors: the unmerged model and the user's model stay valid); the graphs go back to
    their base graphs, so the forward costs what the base model's does. Every layer under
    ``gm`` is merged, also one that only an argument pattern not traced yet calls.
    """
    merged: dict[int, nn.Module] = {}
    for path, layer in _branch_holders(gm):
        if id(layer) not in merged:
            merged[id(layer)] = merged_layer(layer, adapters, safe=safe, quantized=quantized)
        gm.set_submodule(path, merged[id(layer)])
    insert_branches(gm, ())  # no layer carries a branch any more: the base graphs


def _branch_holders(gm: fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """(path, layer) for each path of each layer under ``gm`` that carries branches; not
    inside saved modules or graph modules of their own, which handle theirs."""
    found: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", gm)]
    while stack:
        prefix, module = stack.pop()
        for name, child in module._modules.items():
            if child is None or isinstance(child, (Branch, ModulesToSave, fx.GraphModule)):
                continue
            if branches_of(child):
                found.append((prefix + name, child))
            else:
                stack.append((f"{prefix}{name}.", child))
    return found


@dataclass(frozen=True)
class QuantizedMerge:
    """How a merge writes a quantized layer back: ``dequantize`` (a float layer holding
    ``W_deq + s·ΔW``, in ``dtype`` when given, else the dequantized weight's) or
    ``requantize`` (the layer's own format again; lossy: each layer's largest absolute
    error is recorded in ``errors``, by target path)."""

    mode: Literal["dequantize", "requantize"] = "dequantize"
    dtype: torch.dtype | None = None
    errors: dict[str, float] = field(default_factory=dict)


def merged_layer(
    layer: nn.Module,
    adapters: Sequence[str],
    *,
    safe: bool,
    quantized: QuantizedMerge | None = None,
) -> nn.Module:
    """A copy of ``layer`` with the branches of ``adapters`` merged in and none attached.

    Each branch's method folds it into the weights read by the layer's kind, in order
    (additive methods add ``s·ΔW``, multiplicative ones scale); the kind writes them back
    (a quantized kind as ``quantized`` says)."""
    kind = kind_of(layer)
    weight = kind.weight(layer)
    bias = getattr(layer, "bias", None)
    for branch in branches_of(layer, adapters):
        weight, bias = method_of(branch).merge(kind, layer, branch, weight, bias)
        if safe and not (
            torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
        ):
            raise MergeError(
                f"merging adapter {branch.adapter!r} into {branch.target} gives non-finite "
                "weights; the adapter seems broken"
            )
    how = quantized or QuantizedMerge()
    if kind.quantized and how.mode == "requantize":
        new, error = kind.requantize(layer, weight, bias)
        targets = [b.target for b in branches_of(layer, adapters)]
        how.errors[targets[0] if targets else ""] = error
    else:
        if kind.quantized and how.dtype is not None:
            weight = weight.to(how.dtype)
            bias = None if bias is None else bias.to(how.dtype)
        new = kind.with_weights(layer, weight, bias)
    new._modules = {k: m for k, m in new._modules.items() if not isinstance(m, Branch)}
    return new


def _rebuild_patterns(gm: PatternGraphModule) -> None:
    """Emit every graph of ``gm`` again from its base graphs (after a copy or unpickling)."""
    patterns = patterns_of(gm)
    assert patterns is not None
    active, site = patterns.emitted
    insert_branches(gm, active, site=site)


HOOKS.rebuild = _rebuild_patterns
