"""``hotswap``: a saved adapter (a directory, a hub id, or a state dict and its config)
into a compiled model's prepared adapter, in place (:mod:`adaptc.adapters.hotswap`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adaptc.adapters.hotswap import HotswapError, hotswap_tensors
from adaptc.io.load import AdapterLoadError, read_spec, read_weights, resolve_adapter_dir
from adaptc.methods.lora.spec import LoraAdapter
from adaptc.spec import Spec, SpecError, from_peft_config, load_spec

__all__ = ["hotswap"]


def hotswap(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapter: str = "default",
    *,
    config: Spec | LoraAdapter | Mapping[str, Any] | None = None,
) -> None:
    """Replace adapter ``adapter`` of ``model`` with the one at ``source``, in place.

    ``source`` is an adapter directory (adaptc's or peft's, as ``load_adapter`` reads) or a
    hub id (downloaded as peft does), or a state dict in PEFT's keys with its ``config`` (a PEFT
    ``adapter_config.json`` dict, a spec, or a ``LoraAdapter``). The new adapter may target
    a subset of the old one's layers (the others get zero weights) and have another rank
    (up to the prepared ``max_rank``) or scaling (if prepared). Nothing is written unless
    every check passes. The model may be wrapped by ``torch.compile``.
    """
    where, settings, state = _read_source(source, adapter, config)
    hotswap_tensors(model, settings, state, adapter, where=where)


def _read_source(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapter: str,
    config: Spec | LoraAdapter | Mapping[str, Any] | None,
) -> tuple[str, Any, dict[str, torch.Tensor]]:
    """(where it comes from, the new adapter's settings, its tensors by PEFT key)."""
    if isinstance(source, Mapping):
        if config is None:
            raise HotswapError("hotswap() from a state dict needs its config= as well")
        try:
            settings = _settings_of(config, adapter)
        except SpecError as exc:
            raise HotswapError(f"invalid adapter config: {exc}") from None
        state = dict(source)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise HotswapError("the state dict must map PEFT keys to tensors")
        return "the state dict", settings, state
    if config is not None:
        raise HotswapError("config= is only for a state dict; a directory has its own config")
    directory = resolve_adapter_dir(source)
    spec, folders = read_spec(directory, adapter)
    name = adapter if adapter in spec.adapters else None
    if name is None and len(spec.adapters) == 1:
        name = next(iter(spec.adapters))
    if name is None:
        raise AdapterLoadError(
            f"{directory} holds adapters {', '.join(spec.adapters)}, not {adapter!r}"
        )
    path, state = read_weights(folders[name])
    return str(path), spec.adapters[name], state


def _settings_of(config: Spec | LoraAdapter | Mapping[str, Any], adapter: str) -> Any:
    if isinstance(config, LoraAdapter):
        return config
    if isinstance(config, Mapping) and "peft_type" in config:
        return from_peft_config(config, name=adapter).adapters[adapter]
    spec = load_spec(config)
    return spec.adapters[adapter] if adapter in spec.adapters else spec.adapter()
