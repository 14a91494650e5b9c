"""The plain LoRA branch as graph nodes: ``out = base_out + lora_B(lora_A(dropout(x))) * s``."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from adaptc.methods.lora.branch import SCALING_BUFFER, LoraBranch

__all__ = ["emit_linear_branch", "exact_early_scale"]


def exact_early_scale(scale: float | fx.Node) -> bool:
    """Whether multiplying by ``scale`` commutes exactly with a matmul: a power of two
    (one included), whose products and sums scale without rounding."""
    return isinstance(scale, float) and scale > 0 and math.frexp(scale)[0] == 0.5


def emit_linear_branch(
    graph: fx.Graph,
    x: fx.Node,
    base_out: fx.Node,
    *,
    out_dtype: torch.dtype | None,
    branch: LoraBranch,
    branch_path: str,
) -> fx.Node:
    """``out = base_out + lora_B(lora_A(dropout(x))) * s`` as graph nodes (casts only if needed).

    ``out_dtype`` is the dtype the base layer computes in (its kind's ``compute_dtype``):
    when the adapter's dtype differs, ``x`` is cast to it and the sum back to ``out_dtype``.
    None (a quantized layer, whose result dtype follows its input at run time): ``x`` is
    cast to the adapter's dtype and the LoRA output to the base result's before the add,
    PEFT's order for bitsandbytes layers.

    Before::

        def forward(self, x):
            fc = self.fc(x);  x = None
            return fc

    After (r = 8, lora_alpha = 12, dropout 0)::

        def forward(self, x):
            fc = self.fc(x)
            fc_lora_default_lora_a = self.fc.lora_default.lora_A(x);  x = None
            fc_lora_default_lora_b = self.fc.lora_default.lora_B(fc_lora_default_lora_a)
            mul = fc_lora_default_lora_b * 1.5
            add = fc + mul;  fc = mul = None
            return add

    The scaling costs a pass over the layer's output; the graph avoids it where that is
    exact. With ``s = 1`` (PEFT's default r 8, lora_alpha 8) there is no multiply; with a
    power of two (lora_alpha = 2r, say) it scales the rank-r intermediate instead,
    ``lora_B(lora_A(x) * 2.0)``, which is bit-for-bit ``lora_B(lora_A(x)) * 2.0`` (no
    ``lora_bias``). A branch prepared for hotswapping multiplies by its scaling buffer
    (``fc_lora_default_scaling_tensor = self.fc.lora_default.scaling_tensor``).
    """
    lora_weight = branch.lora_A.weight
    assert isinstance(lora_weight, torch.Tensor)
    runtime = out_dtype is None
    cast = runtime or out_dtype != lora_weight.dtype
    with graph.inserting_before(base_out.next):
        h = x
        if cast:
            h = graph.call_method("to", (h, lora_weight.dtype))
        if branch.lora_dropout is not None:
            h = graph.call_module(f"{branch_path}.lora_dropout", (h,))
        a = graph.call_module(f"{branch_path}.lora_A", (h,))
        scale: fx.Node | float = branch.scaling
        if SCALING_BUFFER in branch._buffers:  # prepared for hotswapping: read, not baked
            scale = graph.get_attr(f"{branch_path}.{SCALING_BUFFER}")
        elif exact_early_scale(scale) and not branch.lora_bias:
            if scale != 1.0:
                a = graph.call_function(operator.mul, (a, scale))
            scale = 1.0
        b = graph.call_module(f"{branch_path}.lora_B", (a,))
        scaled = b if scale == 1.0 else graph.call_function(operator.mul, (b, scale))
        if runtime:  # the LoRA output to the base result's dtype, then the add
            scaled = graph.call_method("type_as", (scaled, base_out))
        out = graph.call_function(operator.add, (base_out, scaled))
        if cast and not runtime:
            out = graph.call_method("to", (out, out_dtype))
    return out
