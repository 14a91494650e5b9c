"""LoRA on ``nn.Linear`` and transformers' ``Conv1D`` (a linear layer whose weight is (in, out))."""

from __future__ import annotations

import torch
from torch import nn

from adaptc.methods.lora.branch import FrozenFactor, LoraBranch
from adaptc.methods.lora.init import freezes_B, init_factors
from adaptc.methods.lora.loftq import loftq_error, log_error
from adaptc.methods.lora.rule import (
    BranchConfig,
    LoraRule,
    Merged,
    adapter_dtype,
    round_as_peft,
)

__all__ = ["LinearRule", "make_linear_branch", "transpose"]


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


class LinearRule(LoraRule):
    """``y = W₀x + b + s·B·A·x`` with ``A``: ``nn.Linear(in, r)``, ``B``: ``nn.Linear(r, out)``.

    For ``nn.Linear`` (weight (out, in)) and transformers' ``Conv1D`` (weight (in, out): the
    kind forces ``fan_in_fan_out``)."""

    batch_form = "linear"  # its mixed-batch kernel (adaptc.adapters.mixed)

    def refuse(self, module: nn.Module, cfg: BranchConfig) -> None:
        super().refuse(module, cfg)
        self.refuse_loftq(module, cfg)

    def check(self, module: nn.Module, cfg: BranchConfig) -> list[str]:
        self.refuse_loftq(module, cfg)
        return super().check(module, cfg)

    def refuse_loftq(self, module: nn.Module, cfg: BranchConfig) -> None:
        if cfg.init == "loftq" and self.fan_in_fan_out(module, cfg.fan_in_fan_out):
            raise ValueError(
                f"{cfg.target}: init 'loftq' is not available on {self.kind.name} layers: their "
                "weight is stored (in, out), and PEFT's LoftQ factors it as stored, giving "
                "factors of the wrong shapes"
            )

    def make_plain_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        return make_linear_branch(self, module, cfg)

    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        A, B = branch.lora_A.weight, branch.lora_B.weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        transposed = self.fan_in_fan_out(module, branch.fan_in_fan_out)
        return transpose(B @ A, transposed) * branch.scaling

    def merge_plain(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        A, B = branch.lora_A.weight, branch.lora_B.weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        if weight.dtype == A.dtype and not branch.lora_bias:  # W + s·B·A in one pass
            if self.fan_in_fan_out(module, branch.fan_in_fan_out):
                return Merged(torch.addmm(weight, A.T, B.T, alpha=branch.scaling))
            return Merged(torch.addmm(weight, B, A, alpha=branch.scaling))
        return super().merge_plain(module, branch, weight)


def make_linear_branch(
    rule: LoraRule, module: nn.Module, cfg: BranchConfig
) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
    """A plain LoRA branch for a linear-like layer, initialised per ``cfg.init``."""
    fan_in, fan_out = rule.features(module)
    weight = rule.kind.weight(module)
    kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
    meta = weight.device.type == "meta"
    # Built (and default-initialised) as PEFT builds them, so the same seed draws the same
    # adapter weights as peft; on the meta device this allocates and draws nothing.
    lora_A = nn.Linear(fan_in, cfg.r, bias=False, **kw)
    lora_B = nn.Linear(cfg.r, fan_out, bias=cfg.lora_bias, **kw)
    transposed = rule.fan_in_fan_out(module, cfg.fan_in_fan_out)
    replaced: dict[str, torch.Tensor] = {}
    if not meta and cfg.init != "random":  # random: the layers' own init (PEFT's False)
        residual = init_factors(
            lora_A.weight,
            lora_B.weight,
            lora_B.bias,
            init=cfg.init,
            scaling=cfg.scaling,
            weight=transpose(weight, transposed),
            pissa_niter=cfg.pissa_niter,
            loftq=cfg.loftq,
        )
        if residual is not None:
            replaced["weight"] = transpose(residual, transposed).contiguous()
        if cfg.init == "loftq" and residual is not None:
            error = loftq_error(weight, residual, lora_A.weight, lora_B.weight, cfg.scaling)
            log_error(cfg.target, error)
    round_as_peft(weight.dtype, lora_A.weight, lora_B.weight, lora_B.bias)
    if freezes_B(cfg.init):  # MiCA: only A trains
        lora_B.weight = FrozenFactor(lora_B.weight.detach())
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
        fan_in_fan_out=transposed,
    )
    return branch, replaced
