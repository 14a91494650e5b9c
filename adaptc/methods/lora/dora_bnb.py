"""DoRA on bitsandbytes' layers (QLoRA with DoRA; PEFT's ``lora.bnb.Linear4bit`` and
``lora.bnb.Linear8bitLt`` with ``use_dora``).

The maths is :class:`~adaptc.methods.lora.dora.DoraLinear`'s; what differs is where the
weight comes from and the casts. The weight norm ``‖W + s·ΔW‖`` reads the *dequantized*
weight, dequantized anew at every forward and dropped after it (PEFT's
``dequantize_module_weight``: nothing dequantized stays resident). As for plain LoRA on
these layers, ``x`` is cast to the adapter's dtype and the layer's output back to the
base result's dtype, which follows the input at run time::

    q_proj = self.q_proj(x)
    to = x.to(torch.float32)
    q_proj_1 = self.q_proj
    dequantized_weight = adaptc_layers_base_dequantized_weight(q_proj_1)
    q_proj_lora_default = self.q_proj.lora_default(to, q_proj, dequantized_weight, None)
    type_as = q_proj_lora_default.type_as(q_proj)

(the layer itself is the function's argument: an 8-bit layer's scales move from its weight
into its matmul state at its first forward.)

A merge reads the dequantized weight too, and gives a float ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from adaptc.layers import dequantized_weight
from adaptc.methods.lora import variants
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.dora import NAME, DoraLinear
from adaptc.methods.lora.rule import LoraRule

__all__ = ["DoraBnb"]


class DoraBnb(DoraLinear):
    """See the module docstring."""

    def emit(
        self,
        rule: LoraRule,
        graph: fx.Graph,
        x: fx.Node,
        base_out: fx.Node,
        *,
        base: nn.Module,
        base_path: str,
        branch: LoraBranch,
        branch_path: str,
    ) -> fx.Node:
        magnitude = branch.lora_magnitude_vector
        assert isinstance(magnitude, torch.Tensor)
        with graph.inserting_before(base_out.next):
            h = graph.call_method("to", (x, magnitude.dtype))
            weight = graph.call_function(dequantized_weight, (graph.get_attr(base_path),))
            has_bias = getattr(base, "bias", None) is not None
            bias = graph.get_attr(f"{base_path}.bias") if has_bias else None
            out = graph.call_module(branch_path, (h, base_out, weight, bias))
            out = graph.call_method("type_as", (out, base_out))
        return out


variants.register(NAME, ("bnb.Linear4bit", "bnb.Linear8bitLt"), DoraBnb())
