"""``save_adapter``: PEFT's adapter directory, plus the adaptc spec beside it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adaptc.adapters.keys import adapter_state_dict
from adaptc.atomic import staged_files
from adaptc.compiler import Compiled, compiled
from adaptc.io.card import CARD_NAME, existing_card, model_card, name_or_path
from adaptc.methods.registry import method
from adaptc.plan.defaults import TASK_MODULES_TO_SAVE
from adaptc.plan.match import model_type
from adaptc.spec import NameTargets, RegexTargets
from adaptc.spec.dump import dump_spec
from adaptc.spec.load import PEFT_CONFIG_NAME, SPEC_FILE_NAME
from adaptc.spec.method import method_spec

__all__ = ["LEGACY_WEIGHTS_NAME", "WEIGHTS_NAME", "save_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's legacy format: torch.save of the tensor dict


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapters: Sequence[str] | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Write the model's adapters as PEFT does, and ``adaptc_spec.yaml`` at the top.

    The model card ``README.md`` is created, or updated when there is one (``adaptc.io.card``).

    ``default`` goes at the top of ``directory``, other adapters in sub-folders named after
    them (PEFT's layout). Only adapter tensors (and ``modules_to_save`` copies) are written,
    in their own dtype. A new directory appears whole or not at all; in an existing
    directory each file is replaced atomically, weights before configs.
    ``safe_serialization=False`` writes PEFT's legacy ``adapter_model.bin`` (a plain
    tensor dict, ``torch.save``; adaptc reads it back with ``weights_only``) instead.
    """
    info = compiled(model, "save_adapter()")
    names = list(adapters) if adapters is not None else list(info.spec.adapters)
    for name in names:
        if name not in info.spec.adapters:
            raise ValueError(
                f"the model has no adapter {name!r} (has: {', '.join(info.spec.adapters)})"
            )
    target = Path(directory)
    files: dict[Path, bytes | dict[str, object]] = {}
    for name in names:
        folder = Path() if name == "default" else Path(name)
        weights = WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME
        files[folder / weights] = {"tensors": adapter_state_dict(model, name)}
        entry = method(info.spec.adapters[name].method)
        config = info.spec.to_peft_config(
            name,
            target_modules=_resolved_targets(model, info, name),
            inference_mode=True,
            settings=entry.with_defaults(info.spec.adapters[name], model_type(model)),
        )
        _as_peft_resolves(config, info, name)
        if config["base_model_name_or_path"] is None:  # as peft: the base model's own name
            config["base_model_name_or_path"] = name_or_path(model)
        if config["task_type"] is None:  # as PeftModel.save_pretrained records the base class
            cls = type(model)
            config["auto_mapping"] = {
                "base_model_class": cls.__name__,
                "parent_library": cls.__module__,
            }
        files[folder / PEFT_CONFIG_NAME] = (json.dumps(config, indent=2) + "\n").encode()
    saved = info.spec
    if set(names) != set(info.spec.adapters):  # the spec beside the files lists what is there
        saved = info.spec.with_adapters({n: info.spec.adapters[n] for n in names})
    files[Path(SPEC_FILE_NAME)] = dump_spec(saved).encode()
    card = model_card(model, saved, existing=existing_card(target), where=str(target / CARD_NAME))
    files[Path(CARD_NAME)] = card.encode()
    _write_all(target, files)
    if not safe_serialization:  # a safetensors file left from before would be read first
        for name in names:
            stale = target / ("" if name == "default" else name) / WEIGHTS_NAME
            stale.unlink(missing_ok=True)
    return target


def _resolved_targets(model: nn.Module, info: Compiled, name: str) -> list[str] | None:
    """What PEFT writes as ``target_modules`` once it has resolved the selector.

    Lists and regexes stay as given; omitted targets become the model type's default
    names; ``all-linear`` (as PEFT does) and ``types`` become the adapted module paths.
    """
    adapter = info.spec.adapters[name]
    paths = [t.path for t in info.plan.selected(name, adapter.method)]  # not tied heads, tokens
    if adapter.layers is not None and not method_spec(adapter.method).peft_has_layers:
        return paths  # PEFT's config cannot restrict layers: the modules it resolved to
    if isinstance(adapter.targets, (NameTargets, RegexTargets)):
        return None
    default_targets = method(adapter.method).default_targets
    kind = model_type(model)
    if adapter.targets is None and kind is not None and kind in default_targets:
        defaults = default_targets[kind]
        if not isinstance(defaults, str):
            return list(defaults)
    return paths


def _as_peft_resolves(config: dict[str, Any], info: Compiled, name: str) -> None:
    """Fields PEFT rewrites in its config while adapting a model, rewritten the same way."""
    targets = info.plan.selected(name, info.spec.adapters[name].method)
    if targets and "fan_in_fan_out" in config:  # PEFT forces fan_in_fan_out per layer type
        config["fan_in_fan_out"] = getattr(targets[-1].settings, "fan_in_fan_out", False)
    heads = TASK_MODULES_TO_SAVE.get(str(info.spec.task_type))
    if heads is not None:  # PEFT's task models add their heads to modules_to_save
        config["modules_to_save"] = [*(config["modules_to_save"] or []), *heads.names]


def _write_all(target: Path, files: dict[Path, bytes | dict[str, object]]) -> None:
    # an existing directory may hold other files (a trainer's checkpoint): replace ours,
    # weights before configs
    order = sorted(files, key=lambda r: r.name not in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME))
    with staged_files(target, order) as staging:
        for rel, content in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict) and rel.name == LEGACY_WEIGHTS_NAME:
                torch.save(content["tensors"], str(path))  # plain tensors: weights_only loads it
            elif isinstance(content, dict):
                save_file(content["tensors"], str(path), metadata={"format": "pt"})  # type: ignore[arg-type]
            else:
                path.write_bytes(content)
