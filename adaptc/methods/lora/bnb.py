"""LoRA on bitsandbytes' 8-bit and 4-bit linear layers (PEFT's ``lora.bnb.Linear8bitLt``
and ``lora.bnb.Linear4bit``: QLoRA).

The branch is a linear branch (``lora_A``/``lora_B``, float32, PEFT's file keys), applied
to the layer's input; only the casts differ, in PEFT's order for bitsandbytes: ``x`` to
the adapter's dtype, the LoRA output to the base result's dtype, then the add (the
result's dtype follows the input at run time, the int8 weight says nothing of it)::

    q_proj = self.q_proj(x)
    to = x.to(torch.float32)
    q_proj_lora_default_lora_a = self.q_proj.lora_default.lora_A(to)
    q_proj_lora_default_lora_b = self.q_proj.lora_default.lora_B(q_proj_lora_default_lora_a)
    type_as = q_proj_lora_default_lora_b.type_as(q_proj)
    add = q_proj + type_as

(PEFT's 4-bit layer clones the base result first, for its in-place add; the graph's add
is not in place.) A merge dequantizes the weight and gives a float ``nn.Linear``
(``W_deq + s·ΔW``). Inits that read or rewrite the base weight (PiSSA, OLoRA, MiCA) are
not available on these layers yet; DoRA is registered for them
(:mod:`adaptc.methods.lora.dora`, which reads the weight dequantized).
"""

from __future__ import annotations

import torch
from torch import nn

from adaptc.methods.lora.quantized import QuantizedRule

__all__ = ["BnbRule"]


class BnbRule(QuantizedRule):
    """See the module docstring (what it refuses: :class:`QuantizedRule`)."""

    def out_dtype(self, base: nn.Module) -> torch.dtype | None:
        return None  # the result's dtype follows the input's: cast the LoRA output to it
