"""Parameter counts, printed exactly as PEFT prints them."""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "parameter_count",
    "print_trainable_parameters",
    "trainable_line",
    "trainable_parameters",
]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` over the model's distinct parameters (tied ones count once)."""
    trainable = total = 0
    for p in model.parameters():
        n = parameter_count(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def parameter_count(p: torch.Tensor) -> int:
    """The parameters ``p`` holds. A bitsandbytes 4-bit weight packs two 4-bit values per
    byte of its storage (``Params4bit`` of ``numel`` bytes holds ``2·numel·itemsize``
    values), as PEFT counts it."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def trainable_line(trainable: int, total: int) -> str:
    """``trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915``."""
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line for ``model`` (see :func:`trainable_line`)."""
    print(trainable_line(*trainable_parameters(model)))
