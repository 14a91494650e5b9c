"""PEFT's state-dict functions: ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``
(an adapter's tensors under the keys of its file), ``get_base_model_state_dict`` /
``set_base_model_state_dict`` (the base model's, under the user's model's keys) and
``load_peft_weights`` (an adapter file read as a state dict).

They take a ``PeftModel`` (keys start with ``base_model.model.``, as PEFT's) or a model
``inject_adapter_in_model`` returned (keys relative to the model, as PEFT's for a model
that is not a ``PeftModel``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from adaptc.adapters.keys import PREFIX, adapter_tensors
from adaptc.compiler import compiled_info
from adaptc.compiler.saved import ModulesToSave
from adaptc.io import resolve_adapter_dir
from adaptc.io.load import IncompatibleKeys, load_state, read_weights
from adaptc.methods.base import Branch

__all__ = [
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]


def _inner(model: Any) -> tuple[nn.Module, bool]:
    """The compiled model inside ``model``, and whether keys carry ``base_model.model.``."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if compiled_info(model) is not None:
        return model, False
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    if isinstance(inner, nn.Module) and compiled_info(inner) is not None:
        return inner, True
    raise ValueError(
        f"expected a model with adapters (get_peft_model / inject_adapter_in_model), "
        f"got a {type(model).__name__}"
    )


def _with_adapter(model: Any, adapter_name: str) -> tuple[nn.Module, bool]:
    """:func:`_inner`, checking that the model has ``adapter_name``."""
    inner, prefixed = _inner(model)
    info = compiled_info(inner)
    assert info is not None
    if adapter_name not in info.spec.adapters:
        raise ValueError(
            f"the model has no adapter {adapter_name!r} (has: {', '.join(info.spec.adapters)})"
        )
    return inner, prefixed


def _local(key: str, prefixed: bool) -> str:
    return key if prefixed else key.removeprefix(PREFIX)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name``'s file, by PEFT key (the adapter name left out).

    With ``state_dict`` (the model's own keys, e.g. gathered by DeepSpeed or FSDP), the
    values are taken from it instead of the model."""
    del unwrap_compiled  # a torch.compile wrapper is always seen through
    if save_embedding_layers not in ("auto", True, False):
        raise ValueError(
            f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}"
        )
    inner, prefixed = _with_adapter(model, adapter_name)
    names = {}
    if state_dict is not None:
        names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in adapter_tensors(inner, adapter_name):
        if save_embedding_layers is False and ".base_layer.weight" in key and ".lora_" not in key:
            continue
        if state_dict is not None:
            tensor = state_dict[names[id(tensor)]]
        out[_local(key, prefixed)] = tensor.detach()
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Copy ``peft_model_state_dict`` (PEFT keys, e.g. from :func:`get_peft_model_state_dict`
    or an adapter file) into ``adapter_name``'s weights; returns the keys of the adapter
    not loaded (``missing_keys``) and those the model has no place for
    (``unexpected_keys``). A tensor of the wrong shape raises (a ``RuntimeError``, as in
    PEFT) unless ``ignore_mismatched_sizes``."""
    del low_cpu_mem_usage  # adapter weights always exist: there is nothing to assign
    inner, prefixed = _with_adapter(model, adapter_name)
    state = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in peft_model_state_dict.items()}
    result = load_state(
        inner, adapter_name, state, source="the state dict", strict=False,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
    )  # fmt: skip
    return IncompatibleKeys(
        [_local(k, prefixed) for k in result.missing_keys],
        [_local(k, prefixed) for k in result.unexpected_keys],
    )


def _base_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """``{key in the user's model: (module, "_parameters" or "_buffers", name)}`` for every
    tensor of the base model inside the compiled ``model``: adapter branches and saved
    copies left out, a saved module's frozen original in its place."""
    found: dict[str, tuple[nn.Module, str, str]] = {}

    def walk(module: nn.Module, path: str) -> None:
        if isinstance(module, Branch):
            return
        if isinstance(module, ModulesToSave):
            walk(module.original_module, path)
            return
        for where in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, where).items():
                if tensor is not None and (
                    where == "_parameters" or name not in module._non_persistent_buffers_set
                ):
                    found.setdefault(f"{path}{name}", (module, where, name))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, path if name == "base_layer" else f"{path}{name}.")

    walk(model, "")
    return found


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under the user's model's keys (no adapter tensors)."""
    inner, _ = _inner(model)
    return {k: getattr(m, where)[n] for k, (m, where, n) in _base_tensors(inner).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load base-model weights given under the user's model's keys (e.g. after FSDP).

    The frozen base tensors are shared with the user's model, so they are replaced, never
    written: the user's model keeps its weights."""
    inner, _ = _inner(model)
    slots = _base_tensors(inner)
    unexpected = [k for k in state_dict if k not in slots]
    missing = [k for k in slots if k not in state_dict]
    if strict and (missing or unexpected):
        errors = []
        if missing:
            errors.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            errors.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    replaced: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in state_dict.items():
            if key not in slots:
                continue
            module, where, name = slots[key]
            old = getattr(module, where)[name]
            if tuple(old.shape) != tuple(value.shape):
                raise RuntimeError(
                    f"Error(s) in loading state_dict: size mismatch for {key}: copying a param "
                    f"with shape {tuple(value.shape)}, the model has {tuple(old.shape)}"
                )
            new = replaced.get(id(old))
            if new is None:
                data = value.detach().to(device=old.device, dtype=old.dtype).clone()
                new = nn.Parameter(data, old.requires_grad) if where == "_parameters" else data
                replaced[id(old)] = new
            getattr(module, where)[name] = new
    return IncompatibleKeys(missing, unexpected)


def load_peft_weights(
    model_id: str | os.PathLike[str],
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """An adapter file's tensors (a directory or a hub id, as PEFT's): safetensors, or a
    legacy ``adapter_model.bin`` read with ``weights_only``."""
    if key_mapping:
        raise ValueError("key_mapping is not supported by adaptc")
    directory = resolve_adapter_dir(
        model_id,
        cache_dir=hf_hub_download_kwargs.get("cache_dir"),
        revision=hf_hub_download_kwargs.get("revision"),
        token=hf_hub_download_kwargs.get("token"),
        local_files_only=bool(hf_hub_download_kwargs.get("local_files_only", False)),
        subfolder=hf_hub_download_kwargs.get("subfolder"),
    )
    _, state = read_weights(directory)
    return {k: v.to(device) for k, v in state.items()} if device is not None else state
