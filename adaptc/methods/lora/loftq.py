"""LoftQ: LoRA factors chosen so that a quantized base weight plus ``B·A`` approximates the
float weight (PEFT's ``init_lora_weights="loftq"`` and ``replace_lora_weights_loftq``).

On a float base (``init: loftq``, :func:`loftq_init`) the base weight ``W`` (out, in) is
quantized by bitsandbytes (NF4 in blocks of 64 without double quantization, or int8 with
one scale per row, from float16) and dequantized again, ``Q``; the residual ``W - Q`` is
factored by its rank-``r`` SVD, ``W - Q ≈ B·A`` with ``B = U_r·√S_r`` and ``A = √S_r·V_rᵀ``.
With more iterations, ``W - B·A`` is quantized again and its residual factored anew. ``Q``
replaces the base weight in the compiled model (as float, in ``W``'s dtype; the user's
weight is never written): a model saved from it and loaded quantized gives ``Q`` back.

From an already quantized base (:func:`loftq_factors`) ``Q`` is the layer's dequantized
weight and ``W`` the float weight read from elsewhere (a checkpoint); one SVD of ``W - Q``.

Both are PEFT's computations, which is deterministic given the weight. As in PEFT the
factors approximate ``W - Q`` itself, while the branch adds ``s·B·A`` (``s = lora_alpha / r``):
only with ``s = 1`` does ``Q + s·B·A`` approximate ``W`` as LoftQ promises (the plan warns
otherwise). :class:`LoftqError` measures it per layer; each initialised layer's is logged
(logger ``adaptc.methods.lora.loftq``, level INFO).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = [
    "LoftqError",
    "backend_problem",
    "loftq_error",
    "loftq_factors",
    "loftq_init",
    "low_rank",
    "quantize_dequantize",
    "scaling_warning",
]

logger = logging.getLogger(__name__)

_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's LoftQ quantizes with


@dataclass(frozen=True)
class LoftqError:
    """How well one layer's quantized base plus its update approximates the float weight
    ``W`` (Frobenius norms): ``quantized = ‖W - Q‖``, ``adapted = ‖W - (Q + s·B·A)‖``."""

    weight: float  # ‖W‖
    quantized: float  # ‖W - Q‖
    adapted: float  # ‖W - (Q + s·B·A)‖

    @property
    def relative(self) -> float:
        """``‖W - (Q + s·B·A)‖ / ‖W - Q‖``: below 1 where the update removes quantization error."""
        if self.quantized == 0:
            return 0.0 if self.adapted == 0 else math.inf
        return self.adapted / self.quantized

    def __str__(self) -> str:
        quantized = self.quantized / self.weight if self.weight else 0.0
        return f"|W - Q| / |W| = {quantized:.4g}, |W - (Q + s·B·A)| / |W - Q| = {self.relative:.4g}"


def backend_problem() -> str | None:
    """Why LoftQ cannot quantize here (bitsandbytes is missing), or None."""
    if _bitsandbytes() is None:
        return (
            "init 'loftq' needs bitsandbytes, which quantizes the base weight "
            "(pip install bitsandbytes)"
        )
    return None


def scaling_warning(scaling: float) -> str | None:
    """The plan's warning when the branch's scaling is not 1 (see the module docstring)."""
    if scaling == 1:
        return None
    return (
        f"init 'loftq' factors W - Q as B·A, but the branch adds s·B·A with s = {scaling:g} "
        "(lora_alpha / r): set lora_alpha = r for Q + s·B·A to approximate W (PEFT computes "
        "the same factors)"
    )


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor, *, bits: int, r: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, A, B)`` for the float ``weight`` (out, in): ``Q`` in ``weight``'s dtype, ``A``
    (r, in) and ``B`` (out, r) in float32, computed on ``weight``'s device."""
    if iterations <= 0:
        raise ValueError("Number of iterations must be greater than 0")
    w = weight.detach().to(torch.float32)  # (out, in)
    residual = w
    for step in range(iterations):
        q = quantize_dequantize(residual, bits)
        A, B = low_rank(w - q, r)
        if step + 1 < iterations:
            residual = w - B @ A
    return q.to(weight.dtype), A, B


@torch.no_grad()
def loftq_factors(
    dequantized: torch.Tensor, weight: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the rank-``r`` SVD of ``weight - dequantized`` (float32)."""
    residual = weight.to(device=dequantized.device, dtype=torch.float32) - dequantized
    return low_rank(residual, r)


def low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B·A`` the rank-``r`` truncated SVD of ``residual`` (out, in)."""
    if residual.dim() != 2:
        raise ValueError(f"Only support 2D matrix, but your input has {residual.dim()} dimensions.")
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()  # (r,)
    B = U[:, :r] * root  # (out, r)
    A = root[:, None] * Vh[:r]  # (r, in)
    return A.contiguous(), B.contiguous()


def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` (float32) quantized as PEFT's LoftQ quantizes it, and dequantized (float32)."""
    bnb = _bitsandbytes()
    if bnb is None:
        raise ValueError(backend_problem())
    if bits == 4:
        data, state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=_BLOCKSIZE, compress_statistics=False,
            quant_type="nf4", quant_storage=torch.uint8,
        )  # fmt: skip
        out: torch.Tensor = bnb.functional.dequantize_4bit(data, state)
        return out
    if bits == 8:
        CB, SCB, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        out = bnb.functional.int8_vectorwise_dequant(CB, SCB)
        return out.to(weight.device)
    raise ValueError("Only nf4 and int8 quantization is supported")


@torch.no_grad()
def loftq_error(
    weight: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
) -> LoftqError:
    """The approximation of ``weight`` (out, in) by ``base + scaling·B·A``."""
    w = weight.detach().to(device=base.device, dtype=torch.float32)
    quantized = w - base.detach().float()
    adapted = quantized - scaling * (B.detach().float() @ A.detach().float())
    return LoftqError(
        float(torch.linalg.norm(w)),
        float(torch.linalg.norm(quantized)),
        float(torch.linalg.norm(adapted)),
    )


def log_error(target: str, error: LoftqError) -> None:
    logger.info("%s: LoftQ %s", target, error)


def _bitsandbytes() -> ModuleType | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes
