"""Saving an adapter trained under DeepSpeed ZeRO-3, whose parameters are partitioned.

Under ZeRO stage 3 every parameter (adapter weights included) is split across the ranks:
a rank's ``param.data`` is an empty tensor, and the parameter carries ``ds_id``,
``ds_numel`` and ``ds_shape``. Reading the adapter as usual then gives empty tensors — the
"empty adapter" PEFT users meet. Here the adapter's tensors (those ``adapter_tensors``
lists: LoRA weights, trained biases, ``modules_to_save`` copies) are gathered with
``deepspeed.zero.GatheredParameters`` first, and copied out before they are partitioned
again::

    from adaptc.integrations import deepspeed as ds

    state = ds.gathered_adapter_state_dict(engine.module)  # on every rank (a collective)
    ds.save_adapter(engine, "out/")                        # every rank calls; rank 0 writes

DeepSpeed is imported only when a partitioned tensor is met, so these functions also work
(without gathering) on ZeRO-0/1/2 models and plain ones.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptc.adapters.keys import adapter_tensors
from adaptc.compiler import compiled_info
from adaptc.io.save import save_adapter as _save

__all__ = ["gathered_adapter_state_dict", "is_partitioned", "save_adapter"]


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter (its data may live on other ranks)."""
    return hasattr(tensor, "ds_id")


def gathered_adapter_state_dict(
    model: nn.Module, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """The adapter file's contents by PEFT key, with ZeRO-3 partitions gathered.

    A collective when the model is partitioned: every rank must call it. Each rank gets
    full, detached, contiguous copies (``adapter_state_dict``'s contents, unpartitioned).
    """
    model = _adaptc_model(model)
    tensors = list(adapter_tensors(model, adapter))
    with _gathered([t for _, t in tensors]):
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors:
            if is_partitioned(tensor):
                _check_full(key, tensor)
                out[key] = tensor.detach().clone().contiguous()  # partitioned again on exit
            else:
                out[key] = tensor.detach().contiguous()
    return out


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapters: Sequence[str] | None = None,
    rank: int | None = None,
) -> Path | None:
    """``adaptc.save_adapter`` for a ZeRO-3 model: gather on every rank, write on rank 0.

    ``model`` is the adaptc model or a wrapper holding it as ``.module`` (DeepSpeed's
    engine). Every rank must call this (gathering is a collective); ``rank`` defaults to
    the ``torch.distributed`` rank. Returns the directory on the writing rank, else None.
    """
    model = _adaptc_model(model)
    info = compiled_info(model)
    assert info is not None  # _adaptc_model found it
    names = list(adapters) if adapters is not None else list(info.spec.adapters)
    unknown = [n for n in names if n not in info.spec.adapters]
    if unknown:
        raise ValueError(
            f"the model has no adapter {unknown[0]!r} (has: {', '.join(info.spec.adapters)})"
        )
    tensors = [kt for name in names for kt in adapter_tensors(model, name)]
    if rank is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
    with _gathered([t for _, t in tensors]):  # each partitioned parameter holds its full data
        for key, tensor in tensors:
            if is_partitioned(tensor):
                _check_full(key, tensor)
        return _save(model, directory, adapters=names) if rank == 0 else None


def _adaptc_model(model: nn.Module) -> nn.Module:
    """The adaptc model itself, unwrapped from DeepSpeed's engine (or DDP) if need be."""
    while compiled_info(model) is None:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(
                f"expected a model returned by adaptc.compile() (or a wrapper of one with "
                f".module), got {type(model).__name__}"
            )
        model = inner
    return model


@contextmanager
def _gathered(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Every partitioned tensor of ``tensors`` gathered (read-only) for the block."""
    partitioned = [t for t in tensors if is_partitioned(t)]
    context: Any = nullcontext()
    if partitioned:
        try:
            deepspeed = importlib.import_module("deepspeed")
        except ImportError as e:
            raise RuntimeError(
                "the model's adapter is partitioned by DeepSpeed ZeRO-3 (parameters with "
                "ds_id), but deepspeed cannot be imported to gather it"
            ) from e
        # modifier_rank=None: read only, nothing is scattered back when the block ends
        context = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with context:
        yield


def _check_full(key: str, tensor: torch.Tensor) -> None:
    expected = getattr(tensor, "ds_numel", None)
    if tensor.numel() == 0 or (isinstance(expected, int) and tensor.numel() != expected):
        raise RuntimeError(
            f"{key}: gathering the ZeRO-3 partitions gave {tensor.numel()} elements, "
            f"expected {expected}"
        )
