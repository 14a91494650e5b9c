"""Dropout without saved copies: ``lora_A(dropout(x))`` as one autograd function.

Eager autograd keeps, per target, the dropped copy of the input (for ``lora_A``'s weight
gradient) and the mask as a float tensor (for the input's gradient): with q, k and v
reading one ``x``, three dropped copies and three masks, 8 bytes per element each in
float32. :func:`dropout_linear` keeps ``x`` (shared with the siblings) and, per mode,

- ``regenerate``: the random generator's state, and draws the same mask again in backward
  (backward restores the generator afterwards: it consumes nothing). Nothing per element;
  the draw costs a kernel on CUDA (Philox), but as much as the forward's on the CPU;
- ``mask``: the mask as booleans (1 byte per element), no second draw;
- ``auto`` (the default): ``regenerate`` on CUDA and XPU, ``mask`` elsewhere.

The mask is drawn as ``torch.nn.functional.dropout`` draws it on that device (the same
calls, the same random numbers consumed), so the outputs, the gradients and the random
stream after the step are bit for bit those of the unoptimised graph, and PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.compiler.hooked import hooked
from adaptc.compiler.leaves import leaf

__all__ = ["dropout_linear", "regenerate_dropout"]


@leaf
def dropout_linear(
    x: torch.Tensor, dropout: nn.Dropout, linear: nn.Linear, mode: str = "auto"
) -> torch.Tensor:
    """``linear(dropout(x))``; when training with gradients, without the dropped copy (the
    mask kept as ``mode`` says: ``regenerate``, ``mask`` or ``auto``)."""
    p = dropout.p
    if (
        not (dropout.training and torch.is_grad_enabled() and 0.0 < p < 1.0)
        or torch.compiler.is_compiling()  # the compiler's partitioner recomputes by itself
        or dropout.inplace
        or hooked(dropout)
        or hooked(linear)  # a hook (ZeRO-3 gathering the weight, say) must run
        or linear.bias is not None
    ):
        return linear(dropout(x))  # type: ignore[no-any-return]
    regenerate = mode == "regenerate" or (mode == "auto" and x.device.type in _PHILOX)
    return _DropoutLinear.apply(x, linear.weight, p, regenerate)


_PHILOX = ("cuda", "xpu")  # counter-based generators: drawing a mask again is cheap


class _DropoutLinear(torch.autograd.Function):
    """``F.linear(F.dropout(x, p), weight)``, saving ``x``, ``weight`` and the RNG state
    (``regenerate``) or the mask as booleans."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, regenerate: bool
    ) -> torch.Tensor:
        ctx.state = _get_state(x.device) if regenerate else None
        dropped, mask = _drop(x, p)
        if regenerate:
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(x, weight, mask if mask.dtype == torch.bool else mask != 0)
        ctx.p = p
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, *kept = ctx.saved_tensors
        if kept:  # the boolean mask: the float one (x's dtype) is ``mask · 1/(1-p)``
            mask = kept[0]
            if x.device.type not in _PHILOX:
                one = torch.ones((), dtype=x.dtype, device=x.device).div_(1 - ctx.p)
                mask = mask.to(x.dtype).mul_(one)  # the forward's noise, bit for bit
            dropped = x * mask if mask.dtype != torch.bool else _masked(x, mask, ctx.p)
        else:
            current = _get_state(x.device)
            _set_state(x.device, ctx.state)
            try:
                dropped, mask = _drop(x, ctx.p)  # the forward's mask, drawn again
            finally:
                _set_state(x.device, current)
        g = grad.reshape(-1, grad.shape[-1])  # (N, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # what autograd computes for linear, then dropout
            grad_dropped = g.mm(weight).view(x.shape)
            grad_x = _drop_backward(grad_dropped, mask, ctx.p)
        if ctx.needs_input_grad[1]:
            grad_w = g.t().mm(dropped.reshape(-1, dropped.shape[-1]))  # (r, in)
        return grad_x, grad_w, None, None


def _masked(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """The fused kernel's ``dropout(x)`` from its boolean mask (its backward's formula)."""
    return torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1 - p))  # type: ignore[no-any-return]


def _drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x), mask)`` exactly as ``F.dropout(x, p, True)`` computes it: the fused
    kernel on CUDA and XPU (a boolean mask), ``x * (bernoulli(1-p) / (1-p))`` elsewhere."""
    if x.device.type in ("cuda", "xpu"):
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * noise, noise


def _drop_backward(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1 - p))  # type: ignore[no-any-return]
    return grad * mask


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)  # type: ignore[no-any-return]


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def regenerate_dropout(graph: fx.Graph, owner: nn.Module, mode: str = "auto") -> int:
    """Rewrite each ``linear(dropout(x))`` of ``graph`` into one :func:`dropout_linear` node.

    Matches an ``nn.Dropout`` call whose only user is an ``nn.Linear`` without bias (a
    LoRA branch's ``lora_dropout`` and ``lora_A``). Before::

        def forward(self, x):
            fc = self.fc(x)
            fc_lora_default_lora_dropout = self.fc.lora_default.lora_dropout(x);  x = None
            fc_lora_default_lora_a = self.fc.lora_default.lora_A(fc_lora_default_lora_dropout)
            ...

    After::

        def forward(self, x):
            fc = self.fc(x)
            fc_lora_default_lora_dropout = self.fc.lora_default.lora_dropout
            fc_lora_default_lora_a_1 = self.fc.lora_default.lora_A
            dropout_linear = adaptc_compiler_dropout_dropout_linear(
                x, fc_lora_default_lora_dropout, fc_lora_default_lora_a_1, 'auto')
            ...

    Returns the number of rewrites.
    """
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.users) != 1 or len(node.args) != 1:
            continue
        dropout = owner.get_submodule(str(node.target))
        (user,) = node.users
        if type(dropout) is not nn.Dropout or user.op != "call_module" or user.args != (node,):
            continue
        linear = owner.get_submodule(str(user.target))
        if type(linear) is not nn.Linear or linear.bias is not None or user.kwargs:
            continue
        with graph.inserting_before(user):
            d = graph.get_attr(str(node.target))
            lin = graph.get_attr(str(user.target))
            new = graph.call_function(dropout_linear, (node.args[0], d, lin, mode))
        new.meta = {**user.meta, "adaptc": {**user.meta.get("adaptc", {}), "pass": "dropout"}}
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        graph.erase_node(node)
        done += 1
    return done
