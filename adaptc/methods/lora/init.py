"""Initialisation of LoRA factors, as PEFT does it (``init_lora_weights``).

Factors are given in the "linear" layout: ``A`` is (r, fan_in), ``B`` is (fan_out, r), and
the base weight ``W`` is (fan_out, fan_in). PiSSA and OLoRA also return the residual base
weight ``W - s·B·A`` that replaces the base weight in the compiled model (the user's
original weight is never written). The other inits leave the base weight as it is:

* ``orthogonal`` draws, as PEFT does and in its order, on the CPU generator: ``Q`` from
  the QR of an (r, r) normal matrix, ``A = (N(fan_in, r/2) · Q[0::2])ᵀ / 10`` and
  ``B = N(r/2, fan_out)ᵀ · Q[1::2] / 10``; the two halves of ``Q``'s rows are orthogonal,
  so ``B·A = 0`` (to rounding). Both are rounded to the base weight's dtype, as PEFT does.
* ``mica`` (Minor Component Adaptation): ``B`` is the ``r`` left singular vectors of ``W``
  with the smallest singular values (rounded to ``W``'s dtype), ``A = 0``; ``B`` never
  trains (:func:`freezes_B`), only ``A`` learns.
* ``loftq`` (:mod:`adaptc.methods.lora.loftq`): ``B·A`` factors ``W - Q`` for ``Q`` the
  weight quantized by bitsandbytes and dequantized; ``Q`` is returned as the new base weight.
* ``eva``: ``A`` keeps the layer's own draw and ``B = 0`` until ``adaptc.initialize_eva``
  sets ``A`` (and the rank) from the data; without it, the branch is trained from there,
  as PEFT's is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adaptc.methods.lora.loftq import backend_problem, loftq_init, scaling_warning

__all__ = ["REWRITES_BASE", "freezes_B", "init_factors", "init_problem", "init_warning"]

# inits that take r components of the base weight, so r ≤ min(fan_in, fan_out)
_FROM_WEIGHT = ("pissa", "olora", "mica", "loftq")
# inits that replace the base weight in the compiled model (PiSSA/OLoRA residuals, LoftQ's Q)
REWRITES_BASE = ("pissa", "olora", "loftq")
# base weight dtypes PEFT initialises MiCA from
_MICA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    loftq: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """Fill ``A``/``B`` in place; return the new base weight for PiSSA/OLoRA (the residual)
    and LoftQ (the quantized weight, ``loftq`` = (bits, iterations)), else None."""
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
    if init == "eva":  # A as drawn (initialize_eva replaces it), B = 0: PEFT's
        nn.init.zeros_(B)
        return None
    if init == "random":  # PEFT's init_lora_weights=False: nn.Linear's own initialisation
        _linear_default(A, None)
        _linear_default(B, B_bias)
        return None
    if weight is None:
        raise ValueError(f"init {init!r} needs the base weight")
    problem = init_problem(init, r, A.shape[1], B.shape[0], weight.dtype)
    if problem is not None:
        raise ValueError(problem)
    if init == "orthogonal":
        a, b = _orthogonal(r, A.shape[1], B.shape[0])
        A.copy_(a.to(weight.dtype))
        B.copy_(b.to(weight.dtype))
        return None
    if init == "loftq":
        bits, iterations = loftq or (4, 1)
        q, a, b = loftq_init(weight, bits=bits, r=r, iterations=iterations)
        A.copy_(a)
        B.copy_(b)
        return q
    w = weight.detach().to(torch.float32)  # (fan_out, fan_in)
    if init == "mica":
        U = torch.linalg.svd(w, full_matrices=False)[0]  # (fan_out, k), by descending S
        A.zero_()
        B.copy_(U[:, -r:].to(weight.dtype))
        return None
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


def init_problem(init: str, r: int, fan_in: int, fan_out: int, dtype: torch.dtype) -> str | None:
    """Why PEFT cannot give a rank-``r`` branch on a (fan_out, fan_in) weight of ``dtype``
    the init ``init``, as a message; None when it can."""
    if init == "orthogonal" and r % 2:
        return f"init 'orthogonal' needs an even rank, got r={r}"
    if init in _FROM_WEIGHT and r > min(fan_in, fan_out):
        return (
            f"r={r} is larger than the layer allows for init {init!r} "
            f"(min(in, out) = {min(fan_in, fan_out)})"
        )
    if init == "mica" and dtype not in _MICA_DTYPES:
        return f"init 'mica' needs a float32, float16 or bfloat16 base weight, not {dtype}"
    if init == "loftq":
        return backend_problem()
    return None


def init_warning(init: str, scaling: float) -> str | None:
    """A warning about how ``init`` works with the branch's ``scaling``, or None."""
    return scaling_warning(scaling) if init == "loftq" else None


def freezes_B(init: str) -> bool:
    """Whether ``B`` never trains after ``init``: MiCA's does not (PEFT freezes it)."""
    return init == "mica"


def _orthogonal(r: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``orthogonal_init`` draws, in its order: ``(A, B)``, (r, fan_in) and (fan_out, r)."""
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = Q[0::2, :], Q[1::2, :]  # (r/2, r) each, mutually orthogonal rows
    a = torch.randn(fan_in, r // 2).mm(q_odd).T / 10.0  # (r, fan_in)
    b = torch.randn(r // 2, fan_out).T.mm(q_even) / 10.0  # (fan_out, r)
    return a.contiguous(), b.contiguous()


def _linear_default(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``reset_parameters`` of ``nn.Linear``/``nn.ConvNd`` on bare tensors."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
