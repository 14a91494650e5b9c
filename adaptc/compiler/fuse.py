"""Sibling LoRA ``A`` factors as one matmul: the targets that read the same input.

An MLP's ``gate_proj`` and ``up_proj`` (q, k and v where attention traces) read one
``x``; each branch's ``lora_A`` is a thin (r, in) matmul over it, and in backward each
adds its own ``grad @ A`` into ``x``'s gradient. :func:`fused_linear` runs them as one
matmul over the concatenated factors (r₁ + r₂ + … rows) and splits the result: one
kernel forward, one for the input's gradient and one for the factors' (in place of a
kernel and an add per sibling). The factors stay separate parameters, so the state
dict, the files and the optimizer see what they saw. Not bit-identical: the fused matmul
sums the siblings' input gradients in another order (well within parity tolerance).
"""

from __future__ import annotations

import operator
import weakref
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.compiler.hooked import hooked
from adaptc.compiler.leaves import leaf

__all__ = ["fuse_siblings", "fused_linear"]


@leaf
def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(linear(x) for linear in linears)`` as one matmul (bias-free linears)."""
    if torch.compiler.is_compiling() or any(map(hooked, linears)):  # ZeRO-3 gathering, say
        return tuple(m(x) for m in linears)  # (the compiler fuses by itself)
    weights = [m.weight for m in linears]
    # (r₁ + r₂ + …, in); in inference, kept while the factors stay as they are
    grad = torch.is_grad_enabled()
    weight = torch.cat(weights) if grad else _concatenated(linears[0], weights)
    return F.linear(x, weight).split([w.shape[0] for w in weights], dim=-1)  # type: ignore[no-any-return, no-untyped-call]


# first linear -> (the factors' identities and versions, their concatenation)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, int], ...], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _concatenated(first: nn.Module, weights: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(weights)``, computed again only when a factor changed (an optimizer
    step or a load bumps its version; a new parameter has another identity)."""
    key = tuple((id(w), w._version) for w in weights)
    hit = _CACHE.get(first)
    if hit is not None and hit[0] == key:
        return hit[1]
    weight = torch.cat(weights)
    _CACHE[first] = (key, weight)
    return weight


def fuse_siblings(graph: fx.Graph, owner: nn.Module) -> int:
    """Rewrite the adapter ``nn.Linear`` calls of ``graph`` that read the same node into
    one :func:`fused_linear` node per input. Before (a traced MLP)::

        gate_proj_lora_default_lora_a = self.gate_proj.lora_default.lora_A(x)
        ...
        up_proj_lora_default_lora_a = self.up_proj.lora_default.lora_A(x)

    After::

        gate_proj_lora_default_lora_a_1 = self.gate_proj.lora_default.lora_A
        up_proj_lora_default_lora_a_1 = self.up_proj.lora_default.lora_A
        fused_linear = adaptc_compiler_fuse_fused_linear(
            x, (gate_proj_lora_default_lora_a_1, up_proj_lora_default_lora_a_1))
        getitem = fused_linear[0]
        getitem_1 = fused_linear[1];  fused_linear = None

    Only branch nodes (tagged ``meta["adaptc"]`` by the branch pass) of bias-free linears
    with the same weight dtype and device are fused; base layers never are. Returns the
    number of linears fused.
    """
    groups: dict[tuple[fx.Node, torch.dtype, torch.device], list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_module" or "adapter" not in node.meta.get("adaptc", {}):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        module = owner.get_submodule(str(node.target))
        if type(module) is nn.Linear and module.bias is None:
            w = module.weight
            groups[(node.args[0], w.dtype, w.device)].append(node)
    fused = 0
    for (x, _, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        with graph.inserting_before(nodes[0]):  # the first sibling's place: after x
            mods = tuple(graph.get_attr(str(n.target)) for n in nodes)
            call = graph.call_function(fused_linear, (x, mods))
            call.meta["adaptc"] = {"pass": "fuse_siblings"}
            parts = [graph.call_function(operator.getitem, (call, i)) for i in range(len(nodes))]
        for node, part in zip(nodes, parts, strict=True):
            part.meta = {**node.meta, "adaptc": {**node.meta["adaptc"], "pass": "fuse_siblings"}}
            node.replace_all_uses_with(part)
            graph.erase_node(node)
        fused += len(nodes)
    return fused
