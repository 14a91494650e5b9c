"""Unmerged inference: a LoRA branch's ``B`` matmul, scaling and add as one ``addmm``.

A branch ends ``base_out + lora_B(a) * s``: a matmul writing an output-size tensor, a
multiply over it (none when the graph scaled ``a`` instead) and an add reading both. Without
gradients, :func:`lora_add` computes ``addmm(base_out, a, Bᵀ, alpha=s)``: one kernel, one
output-size tensor (from 64 rows on: below, a matmul and an add are faster on the CPU, and
run). In float32 on the CPU the result is bit for bit the unoptimised graph's
when ``s`` is 1 or the scaling was moved onto ``a`` (a power of two: the graph's default
for ``lora_alpha = r`` or ``2r``); otherwise the product is scaled before it is rounded
(within parity tolerance). With gradients (training) or under ``torch.compile`` it runs
the unoptimised operations; with a hook on ``lora_B``, the module call.

:func:`functional_linears` calls the remaining adapter linears (``lora_A``) as functions.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.compiler.hooked import hooked
from adaptc.compiler.leaves import leaf

__all__ = ["call_linear", "functional_linears", "fuse_add", "lora_add"]


@leaf
def lora_add(
    base_out: torch.Tensor, a: torch.Tensor, lora_B: nn.Linear, scale: float
) -> torch.Tensor:
    """``base_out + lora_B(a) * scale`` (no multiply when ``scale`` is 1)."""
    weight = lora_B.weight
    if hooked(lora_B):
        b = lora_B(a)
    elif (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or a.numel() < _ADDMM_ROWS * a.shape[-1]  # a few rows: the two kernels are faster
        or lora_B.bias is not None
        or not base_out.dtype == a.dtype == weight.dtype
        or base_out.shape[:-1] != a.shape[:-1]
    ):
        b = F.linear(a, weight, lora_B.bias)  # what lora_B(a) computes
    else:
        out = torch.addmm(
            base_out.reshape(-1, base_out.shape[-1]), a.reshape(-1, a.shape[-1]), weight.t(),
            alpha=scale,
        )  # fmt: skip
        return out.view(base_out.shape)
    return base_out + (b if scale == 1.0 else b * scale)  # type: ignore[no-any-return]


_ADDMM_ROWS = 64  # below, a matmul and an add beat addmm on the CPU (decode steps)


@leaf
def call_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(x)`` without the module call's machinery when no hook would run: the same
    ``F.linear`` ``nn.Linear.forward`` computes."""
    if hooked(linear):
        return linear(x)  # type: ignore[no-any-return]
    return F.linear(x, linear.weight, linear.bias)


def functional_linears(graph: fx.Graph, owner: nn.Module) -> int:
    """Rewrite the adapter ``nn.Linear`` calls left in ``graph`` (``lora_A``) into
    :func:`call_linear` nodes: bit for bit the same, without ``Module.__call__`` (a few
    microseconds each, which is what a decode step of one token spends on adapters).
    Returns the number of rewrites."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or "adapter" not in node.meta.get("adaptc", {}):
            continue
        if (
            len(node.args) != 1
            or node.kwargs
            or type(owner.get_submodule(str(node.target))) is not nn.Linear
        ):
            continue
        with graph.inserting_before(node):
            handle = graph.get_attr(str(node.target))
            new = graph.call_function(call_linear, (node.args[0], handle))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


def fuse_add(graph: fx.Graph, owner: nn.Module) -> int:
    """Rewrite each branch's ``base_out + lora_B(a) [* s]`` into one :func:`lora_add` node.

    Before::

        fc_lora_default_lora_b = self.fc.lora_default.lora_B(mul)
        add = fc + fc_lora_default_lora_b

    After::

        fc_lora_default_lora_b_1 = self.fc.lora_default.lora_B
        lora_add = adaptc_compiler_addmm_lora_add(fc, mul, fc_lora_default_lora_b_1, 1.0)

    Returns the number of rewrites."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not operator.add or node.kwargs:
            continue
        if "adapter" not in node.meta.get("adaptc", {}) or len(node.args) != 2:
            continue
        base_out, scaled = node.args
        if not isinstance(base_out, fx.Node) or not isinstance(scaled, fx.Node):
            continue
        scale, b = 1.0, scaled
        if (
            scaled.op == "call_function"
            and scaled.target is operator.mul
            and len(scaled.users) == 1
        ):
            b_arg, factor = scaled.args
            if not isinstance(b_arg, fx.Node) or type(factor) is not float:
                continue
            b = b_arg
            scale = factor
        if b.op != "call_module" or len(b.users) != 1 or len(b.args) != 1 or b.kwargs:
            continue
        lora_B = owner.get_submodule(str(b.target))
        if type(lora_B) is not nn.Linear or lora_B.bias is not None:
            continue
        with graph.inserting_before(node):
            handle = graph.get_attr(str(b.target))
            new = graph.call_function(lora_add, (base_out, b.args[0], handle, scale))
        new.meta = {**node.meta, "adaptc": {**node.meta["adaptc"], "pass": "fuse_add"}}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if scaled is not b:
            graph.erase_node(scaled)
        graph.erase_node(b)
        done += 1
    return done
