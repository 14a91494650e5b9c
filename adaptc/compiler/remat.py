"""Rematerialisation: recompute cheap element-wise activations in backward, save less.

A traced LlamaMLP saves four intermediate-size tensors for backward: ``gate`` (for
``silu``), ``silu(gate)`` and ``up`` (for the product) and the product (for the LoRA on
``down_proj``). :func:`rematerialize` cuts the graph so that only ``gate`` and ``up`` are
saved: the element-wise region (``silu``, ``*``) and the adapter layers reading its
result run inside one :class:`Rematerialized` call, which checkpoints them
(``torch.utils.checkpoint``, non-reentrant, the random state preserved) and recomputes them
in backward. Recomputing the same operations gives the same gradients, bit for bit.

The cut is chosen per region as AOTAutograd's partitioner would for these graphs: from the
tensor an adapter saves, the region grows back through element-wise operations as long as
that does not add a tensor to what is saved (``silu`` replaces its output by its input; an
``add`` of two tensors would replace one by two, so the region stops there).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.compiler.codecache import CachedGraphModule, code_key
from adaptc.compiler.dropout import dropout_linear
from adaptc.compiler.fuse import fused_linear
from adaptc.compiler.leaves import LeafFunctionTracer, leaf

__all__ = ["PREFIX", "Rematerialized", "drop_regions", "invoke", "rematerialize"]

PREFIX = "_adaptc_remat_"  # the children of a graph module that hold its regions

# element-wise operations (cheap to recompute; their output has their input's size)
_ELEMENTWISE_FUNCTIONS = frozenset(
    {
        F.silu, F.gelu, F.relu, F.tanh, F.sigmoid, F.mish, F.leaky_relu, F.elu, F.softplus,
        torch.relu, torch.tanh, torch.sigmoid, torch.mul, torch.add, torch.sub, torch.pow,
        torch.neg, torch.exp, torch.erf, operator.mul, operator.add, operator.sub,
        operator.truediv, operator.pow, operator.neg,
    }
)  # fmt: skip
_ELEMENTWISE_METHODS = frozenset(
    {"mul", "add", "sub", "div", "pow", "neg", "tanh", "sigmoid", "relu", "exp", "erf"}
)


class Rematerialized(nn.Module):
    """One region: its element-wise part (``region``) and the adapter layers reading it
    (``consumers``), run as one call of the graph; ``plain`` is both as one graph.

    While gradients are recorded (eager), the element-wise part runs under
    :class:`_Recompute`, which saves only its inputs and recomputes it in backward, and the
    consumers run under saved-tensor hooks that keep, for a tensor of the region's output,
    the recipe instead of the tensor (recomputed on unpack, without drawing random
    numbers). Otherwise (no grad, torch.compile, an outer saved-tensor hook such as
    activation checkpointing or offloading) both run plainly, as the unoptimised graph."""

    def __init__(
        self,
        region: fx.GraphModule,
        consumers: fx.GraphModule,
        plain: fx.GraphModule,
        region_inputs: list[int],
        consumer_inputs: list[int],
        visible: list[int],
    ) -> None:
        super().__init__()
        self.region = region
        self.consumers = consumers
        self.plain = plain  # both in one graph: the unoptimised operations
        self.region_inputs = region_inputs  # which call arguments each part takes
        self.consumer_inputs = consumer_inputs
        self.visible = visible  # the region outputs the graph reads after the call

    def forward(self, *args: Any) -> tuple[Any, ...]:
        if (
            not torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # the compiler's partitioner chooses by itself
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        ):
            return self.plain(*args)  # type: ignore[no-any-return]
        inputs = [args[i] for i in self.region_inputs]
        rest = [args[i] for i in self.consumer_inputs]
        outs = _Recompute.apply(self.region, *inputs)  # type: ignore[no-untyped-call]
        recipe = _Recipe(self.region, inputs, outs)
        with torch.autograd.graph.saved_tensors_hooks(recipe.pack, recipe.unpack):
            used = self.consumers(*outs, *rest)
        return (*[outs[i] for i in self.visible], *used)


class _Recompute(torch.autograd.Function):
    """``fn(*inputs)`` saving only ``inputs``; backward recomputes ``fn`` and differentiates
    it (the same operations: the same gradients)."""

    @staticmethod
    def forward(ctx: Any, fn: fx.GraphModule, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return tuple(fn(*inputs))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.fn(*inputs)
        pairs = [
            (o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad
        ]
        wanted = [x for x in inputs if x.requires_grad]
        found = torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
        ) if pairs and wanted else [None] * len(wanted)  # fmt: skip
        by_input = dict(zip(map(id, wanted), found, strict=True))
        return (None, *(by_input.get(id(x)) for x in inputs))


class _Recipe:
    """Saved-tensor hooks: a tensor over the storage of a region output is kept as how to
    recompute it (the region's inputs, which :class:`_Recompute` saves anyway)."""

    def __init__(self, fn: fx.GraphModule, inputs: list[Any], outs: tuple[torch.Tensor, ...]):
        self.fn, self.inputs = fn, inputs
        self.storages = {o.untyped_storage().data_ptr(): i for i, o in enumerate(outs)}
        self.values: tuple[torch.Tensor, ...] | None = None

    def pack(self, t: torch.Tensor) -> Any:
        index = self.storages.get(t.untyped_storage().data_ptr())
        if index is None or t.device.type == "meta":
            return t
        return (_PACKED, index, t.size(), t.stride(), t.storage_offset())

    def unpack(self, packed: Any) -> torch.Tensor:
        if not (isinstance(packed, tuple) and packed and packed[0] is _PACKED):
            return packed  # type: ignore[no-any-return]
        _, index, size, stride, offset = packed
        if self.values is None:  # the region again, without gradients (no random draws)
            with torch.no_grad():
                self.values = tuple(self.fn(*self.inputs))
        return self.values[index].as_strided(size, stride, offset)


_PACKED = object()


def drop_regions(owner: nn.Module) -> None:
    """Remove the regions an earlier emission registered on ``owner``."""
    for name in [n for n in owner._modules if n.startswith(PREFIX)]:
        del owner._modules[name]


def rematerialize(graph: fx.Graph, owner: nn.Module) -> int:
    """Checkpoint each element-wise region whose result an adapter layer saves.

    Before (a traced LlamaMLP, dropout 0; the branches' own nodes shortened)::

        add = gate_proj + gate_proj_lora_b      # gate
        silu = torch.nn.functional.silu(add, inplace = False)
        add_1 = up_proj + up_proj_lora_b        # up
        mul = silu * add_1
        down_proj = self.down_proj(mul)
        down_proj_lora_default_lora_a = self.down_proj.lora_default.lora_A(mul)

    After::

        add = gate_proj + gate_proj_lora_b
        add_1 = up_proj + up_proj_lora_b
        down_proj_lora_default_lora_a_1 = self.down_proj.lora_default.lora_A
        _adaptc_remat_0 = self._adaptc_remat_0(add, add_1, down_proj_lora_default_lora_a_1)
        getitem = _adaptc_remat_0[0]            # mul: what down_proj reads
        getitem_1 = _adaptc_remat_0[1]          # lora_A's output (rank r)
        down_proj = self.down_proj(getitem)

    Regions are registered on ``owner`` as ``_adaptc_remat_<i>`` (no parameters: the
    state dict is unchanged). Returns the number of regions.
    """
    regions = 0
    for root in list(graph.nodes):
        # a base node: an adapter's own (its rank-r scaling, say) is never worth a region
        if root.graph is not graph or not _elementwise(root) or "adaptc" in root.meta:
            continue
        consumers = _saving_consumers(root)
        if not consumers:
            continue
        region = _grow(root)
        _replace(graph, owner, root, region, consumers)
        regions += 1
    return regions


def _elementwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _saving_consumers(root: fx.Node) -> list[fx.Node]:
    """The adapter nodes reading ``root`` that save it for backward (with the getitems
    of a fused call)."""
    found: list[fx.Node] = []
    for user in root.users:
        if "adapter" not in user.meta.get("adaptc", {}) and user.target is not fused_linear:
            continue
        module = user.op == "call_module" and user.args == (root,) and not user.kwargs
        dropped = user.target is dropout_linear and user.args[0] is root
        if module or dropped:
            found.append(user)
        elif user.op == "call_function" and user.target is fused_linear and user.args[0] is root:
            found += [user, *user.users]
    return found


def _grow(root: fx.Node) -> list[fx.Node]:
    """The element-wise region ending at ``root``: a producer joins when all its users are
    in the region and it adds at most one tensor to the region's inputs."""
    region = {root}
    inputs = set(_tensor_inputs(root))
    work = list(inputs)
    while work:
        node = work.pop(0)
        if node in region or not _elementwise(node) or not set(node.users) <= region:
            continue
        new = set(_tensor_inputs(node)) - inputs - region
        if len(new) > 1:
            continue
        region.add(node)
        inputs.discard(node)
        inputs |= new
        work += list(new)
    return [n for n in root.graph.nodes if n in region]  # in graph order


def _tensor_inputs(node: fx.Node) -> Iterable[fx.Node]:
    return (n for n in node.all_input_nodes if n.op != "get_attr")


def _replace(
    graph: fx.Graph,
    owner: nn.Module,
    root: fx.Node,
    region: list[fx.Node],
    consumers: list[fx.Node],
) -> None:
    consumers = [_call_through_handle(graph, n) for n in consumers]
    inside = set(region) | set(consumers)
    ordered = [n for n in graph.nodes if n in inside]
    inputs: list[fx.Node] = []  # external nodes, in first-use order
    for node in ordered:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    # the region's outputs: what the consumers or the rest of the graph read of it
    region_set = set(region)
    region_outs = [n for n in region if any(u not in region_set for u in n.users)]
    part_r, r_inputs = _subgraph(region, region_outs, inputs, {})
    consumer_outs = [n for n in consumers if any(u not in inside for u in n.users)]
    fed = {n: i for i, n in enumerate(region_outs)}  # consumers read these first
    part_c, c_inputs = _subgraph(consumers, consumer_outs, inputs, fed)
    visible = [i for i, n in enumerate(region_outs) if any(u not in inside for u in n.users)]
    outputs = [region_outs[i] for i in visible] + consumer_outs
    plain, _ = _subgraph(ordered, outputs, inputs, {})  # both parts, for a plain run
    name = _free_name(owner)
    owner.add_module(name, _region(part_r, part_c, plain, r_inputs, c_inputs, visible))
    with graph.inserting_before(root.next):  # in order, right after the region's end
        new_inputs = [  # module handles again here: the originals may come later
            graph.get_attr(str(arg.target)) if arg.op == "get_attr" else arg for arg in inputs
        ]
        call = graph.call_module(name, tuple(new_inputs))
    call.meta["adaptc"] = {"pass": "rematerialize"}
    with graph.inserting_before(call.next):
        parts = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for node, part in zip(outputs, parts, strict=True):
        part.meta = dict(node.meta)
        node.replace_all_uses_with(part, delete_user_cb=lambda u: u not in inside)
    for node in reversed(ordered):
        graph.erase_node(node)
    for arg in inputs:
        if arg.op == "get_attr" and not arg.users:
            graph.erase_node(arg)


@leaf
def invoke(module: nn.Module, *args: Any) -> Any:
    """``module(*args)``: a module call with the module passed in (dynamo traces this, not
    ``operator.call``)."""
    return module(*args)


def _call_through_handle(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A module call as ``invoke(module, ...)``: the module becomes an input (a region graph
    has no children of its own)."""
    if node.op != "call_module":
        return node
    with graph.inserting_before(node):
        handle = graph.get_attr(str(node.target))
        call = graph.call_function(invoke, (handle, *node.args))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call


def _subgraph(
    nodes: list[fx.Node], outs: list[fx.Node], inputs: list[fx.Node], fed: dict[fx.Node, int]
) -> tuple[fx.Graph, list[int]]:
    """``nodes`` as a graph of their own: placeholders for the ``fed`` nodes (in order),
    then for the external ``inputs`` they use (whose indices are returned)."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in fed:
        env[node] = sub.placeholder(node.name)
    used = [i for i, arg in enumerate(inputs) if any(arg in n.all_input_nodes for n in nodes)]
    for i in used:
        env[inputs[i]] = sub.placeholder(inputs[i].name)
    for node in nodes:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[n] for n in outs))
    sub._tracer_cls = LeafFunctionTracer  # unpickling traces the code: keep the leaves
    return sub, used


def _region(
    part_r: fx.Graph,
    part_c: fx.Graph,
    plain: fx.Graph,
    r_inputs: list[int],
    c_inputs: list[int],
    visible: list[int],
) -> Rematerialized:
    """The region module for these graphs: one instance per distinct pair, shared (a region
    holds no state: its modules come in as arguments), so the 32 MLP blocks of a 7B model
    build one."""
    key_r, key_c = code_key(part_r), code_key(part_c)
    key = (
        None
        if key_r is None or key_c is None
        else (key_r, key_c, *map(tuple, (r_inputs, c_inputs, visible)))
    )
    found = _REGIONS.get(key) if key is not None else None
    if found is None:
        found = Rematerialized(
            CachedGraphModule(nn.Module(), part_r, "Region"),
            CachedGraphModule(nn.Module(), part_c, "RegionConsumers"),
            CachedGraphModule(nn.Module(), plain, "RegionPlain"),
            r_inputs, c_inputs, visible,
        )  # fmt: skip
        if key is not None:
            if len(_REGIONS) >= 1024:
                _REGIONS.clear()
            _REGIONS[key] = found
    return found


_REGIONS: dict[tuple[Any, ...], Rematerialized] = {}


def _free_name(owner: nn.Module) -> str:
    i = 0
    while f"{PREFIX}{i}" in owner._modules:
        i += 1
    return f"{PREFIX}{i}"
