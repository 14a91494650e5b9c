"""LoRA on quantized linear layers: torchao (PEFT's ``TorchaoLoraLinear``, plain
``lora.Linear`` for an ``NF4Tensor`` weight), optimum-quanto's ``QLinear`` (plain
``lora.Linear``) and HQQ's ``HQQLinear`` (``HqqLoraLinear``).

The branch is a linear branch (``lora_A``/``lora_B``, PEFT's file keys) on the layer's
input, ``y = Q(W)x + s·B·A·x`` with ``Q(W)`` the layer's quantized product. The casts are
those of PEFT's ``lora.Linear``, which all three follow: ``x`` to the adapter's dtype, the
add, then the sum to the dtype the layer computes in (its kind's ``compute_dtype``: the
float dtype the torchao/quanto weight reports, HQQ's ``compute_dtype``). No cast is
emitted where the dtypes agree (a float32 base). On a bfloat16 HQQ layer with a float32
adapter::

    q_proj = self.q_proj(x)
    to = x.to(torch.float32)
    q_proj_lora_default_lora_a = self.q_proj.lora_default.lora_A(to)
    q_proj_lora_default_lora_b = self.q_proj.lora_default.lora_B(q_proj_lora_default_lora_a)
    add = q_proj + q_proj_lora_default_lora_b   # bfloat16 + float32: float32
    to_1 = add.to(torch.bfloat16)

(bitsandbytes casts the LoRA output before the add instead: :mod:`adaptc.methods.lora.bnb`.)
A merge dequantizes the weight and gives a float ``nn.Linear`` (``W_deq + s·ΔW``). Inits
that read or rewrite the base weight (PiSSA, OLoRA, MiCA) and DoRA are not available on
these layers; ``lora_bias`` is refused where PEFT refuses it (torchao subclasses other
than NF4, HQQ).
"""

from __future__ import annotations

from torch import nn

from adaptc.layers.torchao import is_nf4
from adaptc.methods.lora.linear import LinearRule
from adaptc.methods.lora.rule import BranchConfig

__all__ = ["HqqRule", "QuantizedRule", "TorchaoRule"]

_BASE_INITS = ("pissa", "olora", "mica")  # they read or rewrite the (quantized) weight


class QuantizedRule(LinearRule):
    """LoRA on a quantized linear layer (see the module docstring); optimum-quanto's."""

    def refuse(self, module: nn.Module, cfg: BranchConfig) -> None:
        super().refuse(module, cfg)
        if cfg.init == "loftq":
            raise ValueError(
                f"{cfg.target}: init 'loftq' quantizes a float base weight itself: compile "
                f"onto the float model, or initialise the LoRA of a quantized base "
                "(bitsandbytes 4-bit) from the float weights with adaptc.initialize_loftq "
                "(PEFT's replace_lora_weights_loftq)"
            )
        if cfg.init in _BASE_INITS:
            raise ValueError(
                f"{cfg.target}: init {cfg.init!r} is not available on {self.kind.name} "
                "(quantized) layers yet"
            )
        if cfg.lora_bias and self.refuses_lora_bias(module):
            raise ValueError(
                f"{cfg.target}: lora_bias is not available on {self.kind.name} layers "
                "(PEFT refuses it there too)"
            )

    def refuses_lora_bias(self, module: nn.Module) -> bool:
        return False

    def check(self, module: nn.Module, cfg: BranchConfig) -> list[str]:
        self.refuse(module, cfg)
        return super().check(module, cfg)


class TorchaoRule(QuantizedRule):
    """PEFT's ``TorchaoLoraLinear`` (no ``lora_bias``); plain ``lora.Linear`` on NF4."""

    def refuses_lora_bias(self, module: nn.Module) -> bool:
        return not is_nf4(module.weight)


class HqqRule(QuantizedRule):
    """PEFT's ``HqqLoraLinear`` (no ``lora_bias``)."""

    def refuses_lora_bias(self, module: nn.Module) -> bool:
        return True
