"""PEFT's special forward arguments on the facade's models (``adapter_names``, …)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adaptc.adapters import activated, active_adapters, alora_adapters, invocation_offsets
from adaptc.adapters.mixed import BASE, adapter_names, mixed_batch
from adaptc.compiler import merged_adapters
from adaptc.peft.config import NotSupportedError

__all__ = ["SPECIAL_FORWARD_ARGS", "check_special", "first_input", "special_forward"]

SPECIAL_FORWARD_ARGS: dict[str, str] = {}  # PEFT's that adaptc refuses: name -> feature


@contextmanager
def special_forward(model: nn.Module, kwargs: dict[str, Any], first: Any) -> Iterator[None]:
    """PEFT's special forward arguments: ``adapter_names`` (a mixed-adapter batch, one name
    per sample, ``"__base__"`` for the base model) runs inside ``adaptc.mixed_batch``;
    ``alora_offsets`` (computed from the input ids when an aLoRA adapter runs and none are
    given) inside ``adaptc.activated``. ``kwargs`` loses them; ``first`` is the batch's
    first input (its length must match ``adapter_names``)."""
    names = kwargs.pop("adapter_names", None)
    offsets = kwargs.pop("alora_offsets", None)
    check_special(kwargs)
    if offsets is None:
        offsets = _alora_offsets(model, names, kwargs, first)
    if offsets is not None:
        if isinstance(kwargs.get("num_beams"), int) and kwargs["num_beams"] > 1:
            raise ValueError("Beam search not yet supported for aLoRA.")
        with activated(model, offsets), _mixed(model, names, first):
            yield
        return
    with _mixed(model, names, first):
        yield


def _alora_offsets(
    model: nn.Module, names: Sequence[str] | None, kwargs: dict[str, Any], first: Any
) -> list[int | None] | None:
    """PEFT's ``alora_offsets`` for the batch, when an aLoRA adapter runs in it (the active
    one, or a sample's in ``adapter_names``): from the input ids, per sample with its own
    adapter's invocation tokens. None when no aLoRA adapter is involved."""
    adapters = alora_adapters(model)
    active = active_adapters(model)
    if not adapters or not ((active and active[0] in adapters) or set(names or ()) & set(adapters)):
        return None
    ids = kwargs.get("input_ids", first)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        warnings.warn(
            "Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling "
            "aLoRA for this forward pass.",
            UserWarning,
            stacklevel=4,
        )
        return [None] * (len(first) if first is not None else 0)
    rows = ids if ids.dim() == 2 else ids.unsqueeze(0)
    offsets: list[int | None] = []
    for i, row in enumerate(rows):
        name = names[i] if names is not None and i < len(names) else active[0] if active else None
        tokens = adapters.get(name) if name is not None else None
        offsets.append(None if tokens is None else invocation_offsets(row, tokens)[0])
    return offsets


@contextmanager
def _mixed(model: nn.Module, names: Sequence[str] | None, first: Any) -> Iterator[None]:
    """``adapter_names``: a mixed-adapter batch (``adaptc.mixed_batch``), after PEFT's checks."""
    if names is None:
        yield
        return
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if merged_adapters(model):
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call "
            "`unmerge_adapter` first."
        )
    unknown = {n for n in names if n != BASE} - set(adapter_names(model))
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}"
        )
    if first is not None and hasattr(first, "shape") and len(first) != len(names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(names)} and {len(first)} respectively."
        )
    with mixed_batch(model, list(names)):
        yield


def first_input(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return kwargs.get("input_ids", kwargs.get("inputs_embeds"))


def check_special(kwargs: dict[str, Any]) -> None:
    """Refuse PEFT's special forward arguments when set (and drop them when None)."""
    for key, feature in SPECIAL_FORWARD_ARGS.items():
        if kwargs.get(key) is not None:
            raise NotSupportedError(f"{key} ({feature}) is not supported by adaptc")
        kwargs.pop(key, None)
