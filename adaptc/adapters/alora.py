"""Running aLoRA adapters (``alora_invocation_tokens``): where in each input they apply.

An aLoRA adapter applies from the last occurrence of its invocation sequence on. For a
batch of input ids, :func:`invocation_offsets` finds, per sample, how many of the last
positions that is (PEFT's ``alora_offsets``: ``len(ids) - start``; None when the sequence
is absent, so the sample runs the base model). :func:`activated` sets offsets on the
model's aLoRA branches for a block; every forward inside (also each step of a
``generate``, whose new tokens all come after the invocation) uses them::

    with adaptc.activated(model, input_ids):     # or offsets: a list, one per sample
        out = model(input_ids)

Outside such a block an aLoRA adapter does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adaptc.compiler import CompileError, compiled
from adaptc.methods.lora.alora import NAME, OFFSETS
from adaptc.methods.lora.branch import LoraBranch

__all__ = ["activated", "alora_adapters", "invocation_offsets"]

Offsets = Sequence[int | None]


def alora_adapters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The model's aLoRA adapters and their invocation tokens."""
    info = compiled(model, "alora_adapters()")
    found = {}
    for name, settings in info.spec.adapters.items():
        tokens = getattr(settings, "alora_invocation_tokens", None)
        if tokens is not None:
            found[name] = tuple(tokens)
    return found


def invocation_offsets(input_ids: torch.Tensor, tokens: Sequence[int]) -> list[int | None]:
    """Per sample of ``input_ids`` (``(batch, length)`` or ``(length,)``): the number of
    positions from the last occurrence of ``tokens`` to the end, or None without one."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    want = torch.as_tensor(list(tokens), dtype=ids.dtype, device=ids.device)
    n, length = len(want), ids.shape[1]
    offsets: list[int | None] = []
    for row in ids:
        if n > length:
            offsets.append(None)
            continue
        windows = row.unfold(0, n, 1)  # (length - n + 1, n)
        starts = (windows == want).all(dim=1).nonzero()
        offsets.append(length - int(starts[-1]) if len(starts) else None)
    return offsets


@contextmanager
def activated(
    model: nn.Module, inputs: torch.Tensor | Offsets, adapter: str | None = None
) -> Iterator[nn.Module]:
    """Run ``model``'s aLoRA adapters where their invocation sequence has been seen.

    ``inputs`` is the batch's input ids (the offsets are found with the invocation tokens
    of ``adapter``, by default the first active aLoRA adapter) or the offsets themselves,
    one per sample (None or 0: not active for that sample). Blocks nest; the inner wins.
    """
    info = compiled(model, "activated()")
    branches = [m for m in model.modules() if isinstance(m, LoraBranch) and m.variant == NAME]
    if isinstance(inputs, torch.Tensor):
        adapters = alora_adapters(model)
        name = adapter or next((a for a in info.active if a in adapters), None)
        if name is None or name not in adapters:
            has = ", ".join(adapters) or "none"
            raise CompileError(
                f"activated(): {adapter or 'no active adapter'} is not an aLoRA adapter "
                f"(the model's aLoRA adapters: {has})"
            )
        offsets: Offsets = invocation_offsets(inputs, adapters[name])
    else:
        offsets = list(inputs)
    device = next((p.device for p in model.parameters()), None)
    value = torch.tensor([0 if o is None else int(o) for o in offsets], device=device)
    previous = [b.__dict__.get(OFFSETS) for b in branches]
    for b in branches:
        b.__dict__[OFFSETS] = value
    try:
        yield model
    finally:
        for b, old in zip(branches, previous, strict=True):
            if old is None:
                b.__dict__.pop(OFFSETS, None)
            else:
                b.__dict__[OFFSETS] = old
