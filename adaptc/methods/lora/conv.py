"""``nn.Conv1d``/``2d``/``3d``: a LoRA branch made of two convolutions (PEFT ``_ConvNd``).

``lora_A`` is a convolution ``in → r`` with the base layer's ``kernel_size``, ``stride`` and
``padding``; ``lora_B`` is a 1×…×1 convolution ``r → out`` with the base layer's ``groups``
(and a bias when ``lora_bias``). As in PEFT:

* ``lora_A`` has no dilation, no groups and zero padding whatever the base layer's
  ``padding_mode``. PEFT's branch then does not line up with the base layer when it is
  dilated, so adaptc refuses dilation (> 1 along a kernel dimension > 1) instead of
  computing a different update; a non-zero ``padding_mode`` only gets a warning;
* ``r`` must be divisible by ``groups``, and layers with ``groups > 1`` cannot be merged;
* only the ``default``, ``gaussian`` and ``random`` inits exist: PEFT raises "Unknown
  initialization" for PiSSA/OLoRA/orthogonal and has no MiCA variant for convolutions;
  adaptc refuses them too;
* the delta weight of a 1×1 ``Conv2d`` is a matrix product, any other kernel the
  convolution of ``Aᵀ`` with ``B`` (kohya's formula).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adaptc.layers import ConvKind
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.init import init_factors
from adaptc.methods.lora.rule import (
    BranchConfig,
    LoraRule,
    Merged,
    adapter_dtype,
    round_as_peft,
)

__all__ = ["CONV_FN", "ConvRule", "make_conv_branch"]

ConvType = type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]
_CONV_CLS: dict[int, ConvType] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvRule(LoraRule):
    """``y = conv(x, W₀) + b + s · B(A(dropout(x)))``; one instance per dimensionality."""

    batch_form = "conv"  # its mixed-batch kernel (adaptc.adapters.mixed)

    def __init__(self, kind: ConvKind) -> None:
        super().__init__(kind)
        self.dims = kind.dims

    def check(self, module: nn.Module, cfg: BranchConfig) -> list[str]:
        self.refuse(module, cfg)
        warnings = super().check(module, cfg)
        assert isinstance(module, nn.modules.conv._ConvNd)
        if module.groups > 1:
            warnings.append(
                f"{cfg.target}: groups={module.groups}; the branch cannot be merged (nor in PEFT)"
            )
            if cfg.variant == "dora":
                warnings.append(
                    f"{cfg.target}: DoRA with groups > 1 computes its weight norm with PEFT's "
                    "reshaping of B·A, which does not respect the groups"
                )
        if module.padding_mode != "zeros":
            warnings.append(
                f"{cfg.target}: padding_mode={module.padding_mode!r}, but lora_A pads with zeros "
                "(as in PEFT), so the merged layer differs from the unmerged one near the borders"
            )
        if cfg.lora_bias and module.bias is None:
            warnings.append(f"{cfg.target}: lora_bias on a layer without bias cannot be merged")
        return warnings

    def refuse(self, module: nn.Module, cfg: BranchConfig) -> None:
        _refuse(module, cfg)

    def make_plain_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        return make_conv_branch(module, cfg), {}

    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        _refuse_merge(module, branch)
        A, B = branch.lora_A.weight, branch.lora_B.weight  # (r, in, *k), (out, r, 1, …)
        weight = module.weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        assert isinstance(weight, torch.Tensor)
        if weight.dim() == 4 and weight.shape[2:4] == (1, 1):  # 1×1 Conv2d: a matrix product
            delta = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:  # (in, r, *k) convolved with (out, r, 1, …): (in, out, *k)
            delta = CONV_FN[self.dims](A.transpose(0, 1), B).transpose(0, 1)
        return delta * branch.scaling

    def merge(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        _refuse_merge(module, branch)
        return super().merge(module, branch, weight)


def _refuse(module: nn.Module, cfg: BranchConfig) -> None:
    """Raise ValueError for what PEFT refuses, or would compute inconsistently."""
    assert isinstance(module, nn.modules.conv._ConvNd)
    kind = type(module).__name__
    if cfg.init in ("pissa", "olora", "orthogonal", "mica", "loftq", "eva"):
        raise ValueError(
            f"{cfg.target}: init {cfg.init!r} is not supported for {kind} (PEFT only has "
            "default, gaussian and random init for convolutions)"
        )
    if cfg.r % module.groups != 0:
        raise ValueError(
            f"{cfg.target}: r={cfg.r} is not divisible by the {kind}'s groups={module.groups}; "
            "choose r as a multiple of groups or do not target this layer"
        )
    dilated = [
        d for d, k in zip(module.dilation, module.kernel_size, strict=True) if d != 1 and k != 1
    ]
    if dilated:
        raise ValueError(
            f"{cfg.target}: the {kind} is dilated (dilation={module.dilation}); PEFT builds "
            "lora_A without dilation, so the update would not match the layer; not supported"
        )


def _refuse_merge(module: nn.Module, branch: LoraBranch) -> None:
    groups = getattr(module, "groups", 1)
    if groups > 1:
        raise ValueError(
            f"{branch.target}: cannot merge into a convolution with groups={groups} "
            "(PEFT does not support it either)"
        )


def make_conv_branch(module: nn.Module, cfg: BranchConfig) -> LoraBranch:
    """A plain, initialised branch for a convolution."""
    assert isinstance(module, nn.modules.conv._ConvNd)
    n = module.weight.dim() - 2
    conv: Callable[..., nn.Module] = _CONV_CLS[n]
    weight = module.weight
    device, dtype = weight.device, adapter_dtype(weight)
    ones = (1,) * n
    # built (and default-initialised) as PEFT builds them: the same seed draws the same
    # adapter weights as peft; on the meta device nothing is allocated or drawn
    lora_A = conv(
        module.in_channels,
        cfg.r,
        module.kernel_size,
        module.stride,
        module.padding,
        bias=False,
        device=device,
        dtype=dtype,
    )
    lora_B = conv(
        cfg.r,
        module.out_channels,
        ones,
        ones,
        groups=module.groups,
        bias=cfg.lora_bias,
        device=device,
        dtype=dtype,
    )
    if weight.device.type != "meta" and cfg.init != "random":  # random: the convs' own init
        A, B, B_bias = lora_A.weight, lora_B.weight, lora_B.bias
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        assert B_bias is None or isinstance(B_bias, torch.Tensor)
        init_factors(A, B, B_bias, init=cfg.init, scaling=cfg.scaling)
    round_as_peft(weight.dtype, lora_A.weight, lora_B.weight, lora_B.bias)  # type: ignore[arg-type]
    return LoraBranch(
        lora_A,
        lora_B,
        scaling=cfg.scaling,
        dropout=cfg.lora_dropout,
        adapter=cfg.adapter,
        target=cfg.target,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_bias=cfg.lora_bias,
        fan_in_fan_out=False,
    )
