"""The dtype names specs and the CLI speak (``fp32``, ``bf16``, ``fp16``) and their torch dtypes."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_name"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``/``bf16``/``fp16`` (the CLI's names), else torch's name (``float64``)."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))
