"""PEFT's special forward arguments on the facade's models (``adapter_names``, …)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from adaptc.adapters.mixed import BASE, adapter_names, mixed_batch
from adaptc.compiler import merged_adapters
from adaptc.peft.config import NotSupportedError

__all__ = ["SPECIAL_FORWARD_ARGS", "check_special", "first_input", "special_forward"]

SPECIAL_FORWARD_ARGS = {"alora_offsets": "aLoRA"}  # PEFT's, refused: name -> feature


@contextmanager
def special_forward(model: nn.Module, kwargs: dict[str, Any], first: Any) -> Iterator[None]:
    """PEFT's special forward arguments: ``adapter_names`` (a mixed-adapter batch, one name
    per sample, ``"__base__"`` for the base model) runs inside ``adaptc.mixed_batch``; the
    others are refused when set. ``kwargs`` loses them; ``first`` is the batch's first
    input (its length must match ``adapter_names``)."""
    names = kwargs.pop("adapter_names", None)
    check_special(kwargs)
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
