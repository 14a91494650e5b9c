"""Reading adapter directories (PEFT's or adaptc's): ``load_adapter`` puts one onto a base
model (a new model), ``load_adapter_into`` adds one to a compiled model (in place)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from adaptc.adapters.keys import (
    AdapterKeyError,
    AdapterShapeError,
    adapter_tensors,
    is_base_tensor,
    without_peft_duplicates,
)
from adaptc.adapters.manage import add_adapter, delete_adapter
from adaptc.compiler import CompileError, compile, compiled_info
from adaptc.hub import ADAPTER_FILES, HubError, is_hub_id, snapshot
from adaptc.io.save import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from adaptc.spec import Spec, SpecError, from_peft_config, load_spec
from adaptc.spec.load import PEFT_CONFIG_NAME, SPEC_FILE_NAME

__all__ = [
    "LEGACY_WEIGHTS_NAME",
    "AdapterLoadError",
    "IncompatibleKeys",
    "add_loaded",
    "choose_adapter",
    "load_adapter",
    "load_adapter_into",
    "load_state",
    "load_weights",
    "read_spec",
    "read_weights",
    "resolve_adapter_dir",
    "sub_adapters",
]


class AdapterLoadError(ValueError):
    """An adapter could not be found or read, or does not fit the model (one line)."""


def load_adapter(
    model: nn.Module,
    source: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    trainable: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """A new model: ``model`` (untouched) with the adapter(s) saved at ``source``.

    ``source`` is a directory written by ``adaptc.save_adapter`` or by peft's
    ``save_pretrained`` (``adapter_model.safetensors``, or a legacy ``adapter_model.bin``,
    read with ``torch.load(weights_only=True)``), or a hub id (``org/name``, downloaded as
    peft does: cache, ``revision``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``). Adapter weights are
    frozen unless ``trainable``. To add an adapter to a model adaptc compiled, use
    :func:`load_adapter_into`.
    """
    if compiled_info(model) is not None:
        raise AdapterLoadError(
            "load_adapter() puts an adapter onto a base model and returns a new model; this "
            "model was compiled by adaptc: add the adapter to it in place with "
            "adaptc.load_adapter_into(model, source, adapter_name=...)"
        )
    directory = resolve_adapter_dir(
        source, cache_dir=cache_dir, revision=revision, token=token,
        local_files_only=local_files_only,
    )  # fmt: skip
    spec, folders = read_spec(directory, adapter_name)
    try:
        new = compile(model, spec)
    except CompileError as exc:
        raise AdapterLoadError(
            f"the adapter at {directory} does not fit this model: {exc}"
        ) from None
    with torch.no_grad():
        for name, folder in folders.items():
            load_weights(new, name, folder)
    if not trainable:
        for p in new.parameters():
            p.requires_grad_(False)
    return new


def load_adapter_into(
    model: nn.Module,
    source: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    trainable: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> list[str]:
    """Add the adapter(s) saved at ``source`` to the compiled ``model``, in place; returns
    their names. They start inactive and nothing else is recompiled (as
    ``adaptc.add_adapter``); on an error nothing is left half-added. ``source`` and the
    options are :func:`load_adapter`'s."""
    if compiled_info(model) is None:
        raise AdapterLoadError(
            "load_adapter_into() adds an adapter to a model adaptc compiled; for a base model "
            "use adaptc.load_adapter(model, source), which returns a new model"
        )
    directory = resolve_adapter_dir(
        source, cache_dir=cache_dir, revision=revision, token=token,
        local_files_only=local_files_only,
    )  # fmt: skip
    spec, folders = read_spec(directory, adapter_name)
    try:
        return add_loaded(model, spec, folders, trainable)
    except CompileError as exc:
        hint = " (pass adapter_name=)" if "already has adapter" in str(exc) else ""
        raise AdapterLoadError(
            f"the adapter at {directory} does not fit this model: {exc}{hint}"
        ) from None


def add_loaded(
    model: nn.Module,
    spec: Spec,
    folders: dict[str, Path],
    trainable: bool,
    *,
    ignore_mismatched_sizes: bool = False,
) -> list[str]:
    """Add the adapters of ``spec`` to the compiled ``model`` in place and load each one's
    weights from its folder; returns their names. ``RecompileNeeded`` (a ``CompileError``)
    when they need a recompile (``adaptc.add_adapter``'s rules); nothing is left half-added."""
    names = add_adapter(model, spec)
    try:
        with torch.no_grad():
            for name in names:
                load_weights(
                    model, name, folders[name], ignore_mismatched_sizes=ignore_mismatched_sizes
                )
    except BaseException:
        for name in names:
            delete_adapter(model, name)
        raise
    for name in names:
        for key, tensor in adapter_tensors(model, name):
            if isinstance(tensor, nn.Parameter) and not is_base_tensor(key):
                tensor.requires_grad_(trainable)
    return names


def resolve_adapter_dir(
    source: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    subfolder: str | None = None,
) -> Path:
    """A local adapter directory for ``source``: a path, or a hub id (``org/name``),
    downloaded into the Hugging Face cache as peft does (``HF_HUB_OFFLINE`` honoured).
    ``subfolder`` is a directory inside it (peft's ``subfolder=``)."""
    path = Path(source)
    if path.is_file() and path.name in (PEFT_CONFIG_NAME, SPEC_FILE_NAME):
        return path.parent
    if path.is_dir():
        return path / subfolder if subfolder else path
    text = str(source)
    if path.exists() or text.count("/") != 1 or not is_hub_id(text):
        raise AdapterLoadError(f"no adapter directory at {text}")
    inside = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        folder = snapshot(
            text,
            what="adapter",
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[inside + pattern for pattern in ADAPTER_FILES],
            token=token,
            local_files_only=local_files_only,
        )
    except HubError as exc:
        raise AdapterLoadError(str(exc)) from None
    return folder / inside if inside else folder


def sub_adapters(directory: Path) -> list[str]:
    """Names of the adapters saved in sub-directories of ``directory`` (peft's layout)."""
    if not directory.is_dir():
        return []
    return sorted(
        p.name for p in directory.iterdir() if p.is_dir() and (p / PEFT_CONFIG_NAME).is_file()
    )


def choose_adapter(directory: Path, name: str | None) -> tuple[Spec, str, Path]:
    """One adapter of an adapter directory: ``(its one-adapter spec, name, its folder)``.

    ``name`` None picks the default one (the top level, or an adaptc spec's first adapter);
    otherwise the adapter of that name (peft's ``DIR/NAME/`` sub-directory). Never another
    one: an unknown name is an error listing what the directory holds.
    """
    if (directory / SPEC_FILE_NAME).is_file():
        spec, folders = read_spec(directory, "default")
        names = list(spec.adapters)
        chosen = names[0] if name is None else name
        if chosen not in spec.adapters:
            raise AdapterLoadError(
                f"{directory} has no adapter {chosen!r} (has: {', '.join(names)})"
            )
        one = spec.with_adapters({chosen: spec.adapters[chosen]}).model_copy(
            update={"merge": False}
        )
        return one, chosen, folders[chosen]
    top = (directory / PEFT_CONFIG_NAME).is_file()
    subs = sub_adapters(directory)
    if (name is not None and name != "default") or (name == "default" and not top):
        if name in subs:
            spec, _ = read_spec(directory / name, name)
            return spec, name, directory / name
        held = (["default"] if top else []) + subs
        raise AdapterLoadError(
            f"{directory} has no adapter {name!r} (has: {', '.join(held) or 'none'})"
        )
    spec, _ = read_spec(directory, "default")
    return spec, "default", directory


def read_spec(directory: Path, adapter_name: str) -> tuple[Spec, dict[str, Path]]:
    """The spec to compile, and the folder holding each adapter's weights."""
    try:
        if (directory / SPEC_FILE_NAME).is_file():
            spec = load_spec(directory / SPEC_FILE_NAME)
            folders = {n: directory if n == "default" else directory / n for n in spec.adapters}
            return spec, folders
        config_path = directory / PEFT_CONFIG_NAME
        if not config_path.is_file():
            subs = sub_adapters(directory)
            if subs:
                raise AdapterLoadError(
                    f"{directory} has no {PEFT_CONFIG_NAME} at its top; it holds the adapters "
                    f"{', '.join(subs)} in sub-directories: load one by its directory, e.g. "
                    f"{directory / subs[0]}"
                )
            raise AdapterLoadError(
                f"{directory} has no {PEFT_CONFIG_NAME} (not an adapter directory)"
            )
        config = _read_json(config_path)
        return from_peft_config(config, name=adapter_name), {adapter_name: directory}
    except SpecError as exc:
        raise AdapterLoadError(f"invalid adapter config in {directory}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path} does not hold a JSON object")
    return data


def read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors_path = folder / WEIGHTS_NAME
    legacy_path = folder / LEGACY_WEIGHTS_NAME
    if safetensors_path.is_file():
        try:
            return safetensors_path, without_peft_duplicates(load_file(str(safetensors_path)))
        except (SafetensorError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AdapterLoadError(
                f"{safetensors_path} is not a readable safetensors file (truncated or corrupt?): "
                f"{reason}"
            ) from None
    if legacy_path.is_file():
        try:
            state = torch.load(legacy_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles; never unpickle code
            raise AdapterLoadError(
                f"{legacy_path} is not a plain tensor checkpoint (refused: only weights are "
                f"loaded, never code): {str(exc).splitlines()[0] if str(exc) else exc!r}"
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise AdapterLoadError(f"{legacy_path} does not hold a dict of tensors")
        return legacy_path, without_peft_duplicates(state)
    raise AdapterLoadError(f"{folder} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


class IncompatibleKeys(NamedTuple):
    """What a load left out, as torch's and peft's load results name it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_weights(
    model: nn.Module, adapter: str, folder: Path, *, ignore_mismatched_sizes: bool = False
) -> IncompatibleKeys:
    """Load the adapter file in ``folder`` into ``adapter``'s tensors: every key must match
    (an :class:`AdapterKeyError` names the first ones otherwise)."""
    path, state = read_weights(folder)
    return load_state(
        model, adapter, state, source=str(path), ignore_mismatched_sizes=ignore_mismatched_sizes
    )


def load_state(
    model: nn.Module,
    adapter: str,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
) -> IncompatibleKeys:
    """Copy ``state`` (PEFT keys, as in an adapter file) into ``adapter``'s tensors.

    ``strict``: every key must match, else an :class:`AdapterKeyError` naming ``source``
    and nothing is written; otherwise what matched is loaded and the rest returned. A
    tensor of the wrong shape is an :class:`AdapterShapeError` (peft's ``RuntimeError``
    "size mismatch"), or with ``ignore_mismatched_sizes`` left as it is, with a warning.
    """
    expected = dict(adapter_tensors(model, adapter))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise AdapterKeyError(f"{source} does not match the model: {'; '.join(parts)}")
    mismatched = []
    for key, param in expected.items():
        tensor = state.get(key)
        if tensor is not None and tuple(tensor.shape) != tuple(param.shape):
            if not ignore_mismatched_sizes:
                raise AdapterShapeError(
                    f"{source}: size mismatch for {key}: it has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            mismatched.append(f"- {key}: found shape {tuple(tensor.shape)} in the checkpoint "
                              f"and {tuple(param.shape)} in the model")  # fmt: skip
    if mismatched:
        warnings.warn(
            f"Some weights of adapter {adapter!r} were not loaded from {source} and keep their "
            "initial values because ignore_mismatched_sizes=True: " + "; ".join(mismatched),
            stacklevel=3,
        )
    with torch.no_grad():
        for key, param in expected.items():
            tensor = state.get(key)
            if tensor is None or tuple(tensor.shape) != tuple(param.shape):
                continue
            value = tensor.to(device=param.device, dtype=param.dtype)
            if is_base_tensor(key):  # e.g. a targeted embedding's base weight: shared with the
                _replace_parameter(model, param, value)  # user's model, never written in place
            else:
                param.copy_(value)
    return IncompatibleKeys(missing, unexpected)


def _replace_parameter(model: nn.Module, old: torch.Tensor, value: torch.Tensor) -> None:
    """Swap ``old`` for a new parameter holding ``value`` everywhere (ties are kept)."""
    new = nn.Parameter(value.clone(), requires_grad=old.requires_grad)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is old:
                module._parameters[name] = new
