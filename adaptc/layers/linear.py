"""``nn.Linear`` and transformers' ``Conv1D`` (a linear layer whose weight is (in, out))."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from adaptc.layers.base import BranchConfig, LayerRule, Merged, adapter_dtype
from adaptc.layers.branch import SCALING_BUFFER, LoraBranch
from adaptc.layers.init import init_factors

__all__ = ["Conv1DRule", "LinearRule", "emit_linear_branch", "transpose"]


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


class LinearRule(LayerRule):
    """``y = W₀x + b + s·B·A·x`` with ``A``: ``nn.Linear(in, r)``, ``B``: ``nn.Linear(r, out)``."""

    name = "nn.Linear"
    layer_type: type[nn.Module] = nn.Linear

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return module.in_features, module.out_features

    def fan_in_fan_out(self, module: nn.Module, requested: bool) -> bool:
        return False  # nn.Linear stores (out, in); PEFT also resets a requested True

    def make_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        if cfg.use_dora:
            from adaptc.layers.dora import make_dora_branch

            return make_dora_branch(self, module, cfg)
        return make_linear_branch(self, module, cfg)

    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        A, B = branch.lora_A.weight, branch.lora_B.weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        fifo = self.fan_in_fan_out(module, branch.fan_in_fan_out)
        return transpose(B @ A, fifo) * branch.scaling

    def merge(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        if getattr(branch, "is_dora", False):
            from adaptc.layers.dora import merge_dora

            return merge_dora(self, module, branch, weight)
        A, B = branch.lora_A.weight, branch.lora_B.weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        if weight.dtype == A.dtype and not branch.lora_bias:  # W + s·B·A in one pass
            if self.fan_in_fan_out(module, branch.fan_in_fan_out):
                return Merged(torch.addmm(weight, A.T, B.T, alpha=branch.scaling))
            return Merged(torch.addmm(weight, B, A, alpha=branch.scaling))
        return super().merge(module, branch, weight)


class Conv1DRule(LinearRule):
    """transformers' ``Conv1D`` (GPT-2): weight (in, out), so ``fan_in_fan_out`` is forced on."""

    name = "transformers.Conv1D"

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        self.layer_type = Conv1D

    def features(self, module: nn.Module) -> tuple[int, int]:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        fan_in, fan_out = weight.shape
        return int(fan_in), int(fan_out)

    def fan_in_fan_out(self, module: nn.Module, requested: bool) -> bool:
        return True


def make_linear_branch(
    rule: LayerRule, module: nn.Module, cfg: BranchConfig
) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
    """A plain LoRA branch for a linear-like layer, initialised per ``cfg.init``."""
    fan_in, fan_out = rule.features(module)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
    meta = weight.device.type == "meta"
    # Built (and default-initialised) as PEFT builds them, so the same seed draws the same
    # adapter weights as peft; on the meta device this allocates and draws nothing.
    lora_A = nn.Linear(fan_in, cfg.r, bias=False, **kw)
    lora_B = nn.Linear(cfg.r, fan_out, bias=cfg.lora_bias, **kw)
    fifo = rule.fan_in_fan_out(module, cfg.fan_in_fan_out)
    replaced: dict[str, torch.Tensor] = {}
    if not meta and cfg.init != "random":  # random: the layers' own init (PEFT's False)
        residual = init_factors(
            lora_A.weight,
            lora_B.weight,
            lora_B.bias,
            init=cfg.init,
            scaling=cfg.scaling,
            weight=transpose(weight, fifo),
            pissa_niter=cfg.pissa_niter,
        )
        if residual is not None:
            replaced["weight"] = transpose(residual, fifo).contiguous()
    branch = LoraBranch(
        lora_A,
        lora_B,
        scaling=cfg.scaling,
        dropout=cfg.lora_dropout,
        adapter=cfg.adapter,
        target=cfg.target,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_bias=cfg.lora_bias,
        fan_in_fan_out=fifo,
    )
    return branch, replaced


def exact_early_scale(scale: float | fx.Node) -> bool:
    """Whether multiplying by ``scale`` commutes exactly with a matmul: a power of two
    (one included), whose products and sums scale without rounding."""
    return isinstance(scale, float) and scale > 0 and math.frexp(scale)[0] == 0.5


def emit_linear_branch(
    graph: fx.Graph,
    x: fx.Node,
    base_out: fx.Node,
    *,
    base: nn.Module,
    branch: LoraBranch,
    branch_path: str,
) -> fx.Node:
    """``out = base_out + lora_B(lora_A(dropout(x))) * s`` as graph nodes (casts only if needed).

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
    base_weight = base.weight
    lora_weight = branch.lora_A.weight
    assert isinstance(base_weight, torch.Tensor) and isinstance(lora_weight, torch.Tensor)
    cast = base_weight.dtype != lora_weight.dtype
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
        out = graph.call_function(operator.add, (base_out, scaled))
        if cast:
            out = graph.call_method("to", (out, base_weight.dtype))
    return out
