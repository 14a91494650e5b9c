"""Initialisation of LoRA factors, as PEFT does it (``init_lora_weights``).

Factors are given in the "linear" layout: ``A`` is (r, fan_in), ``B`` is (fan_out, r), and
the base weight ``W`` is (fan_out, fan_in). PiSSA and OLoRA also return the residual base
weight ``W - s·B·A`` that replaces the base weight in the compiled model (the user's
original weight is never written).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_factors"]


@torch.no_grad()
def init_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    B_bias: torch.Tensor | None,
    *,
    init: str,
    scaling: float,
    weight: torch.Tensor | None = None,
    pissa_niter: int | None = None,
) -> torch.Tensor | None:
    """Fill ``A``/``B`` in place; return the residual base weight for PiSSA/OLoRA, else None."""
    r = A.shape[0]
    if init in ("default", "gaussian"):
        if init == "default":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1 / r)
        nn.init.zeros_(B)
        if B_bias is not None:
            nn.init.zeros_(B_bias)
        return None
    if init == "random":  # PEFT's init_lora_weights=False: nn.Linear's own initialisation
        _linear_default(A, None)
        _linear_default(B, B_bias)
        return None
    if weight is None:
        raise ValueError(f"init {init!r} needs the base weight")
    w = weight.detach().to(torch.float32)  # (fan_out, fan_in)
    if init == "pissa":
        if pissa_niter is None:
            V, S, Uh = torch.linalg.svd(w, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r].clone(), Uh[:r]
        else:
            Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=pissa_niter)
            Uhr = Ur.t()
        Sr /= scaling
        a = torch.diag(torch.sqrt(Sr)) @ Uhr  # (r, fan_in)
        b = Vr @ torch.diag(torch.sqrt(Sr))  # (fan_out, r)
    elif init == "olora":
        Q, R = torch.linalg.qr(w)
        a, b = R[:r].contiguous(), Q[:, :r].contiguous()
    else:
        raise ValueError(f"unknown init {init!r}")
    A.copy_(a)
    B.copy_(b)
    residual: torch.Tensor = (w - scaling * b @ a).to(weight.dtype)
    return residual


def _linear_default(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``reset_parameters`` of ``nn.Linear``/``nn.ConvNd`` on bare tensors."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
