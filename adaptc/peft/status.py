"""PEFT's ``get_layer_status`` / ``get_model_status``: what each adapted layer carries.

The fields are PEFT's (``TunerLayerStatus``, ``TunerModelStatus``). A layer's name is its
path under the ``LoraModel`` (``model.<path in the user's model>``), its ``module_type``
PEFT's (``lora.Linear``); ``modules_to_save`` wrappers are listed too, as PEFT lists its
``ModulesToSaveWrapper``s.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from adaptc.adapters.keys import saved_modules, target_layers
from adaptc.compiler import compiled_info, merged_adapters
from adaptc.counting import trainable_parameters
from adaptc.methods.base import Branch

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def _adapted(model: Any) -> tuple[nn.Module, bool, list[str]]:
    """The compiled model inside ``model`` (a compiled model, or the ``.model`` of a
    LoraModel, also reached from a PeftModel), whether its adapters are enabled, and the
    active ones (also while disabled)."""
    for inner in (model, getattr(model, "model", None)):
        if isinstance(inner, nn.Module) and (info := compiled_info(inner)) is not None:
            return inner, not info.disabled, list(info.active)
    raise ValueError(
        "No adapter layers found in the model, please ensure that it's a PEFT model or that "
        "you have PEFT adapters injected in the model."
    )


def _uniform(values: list[bool]) -> bool | Irregular:
    return True if all(values) else False if not any(values) else "irregular"


def _grads(module: nn.Module) -> list[bool]:
    return [p.requires_grad for p in module.parameters()]


def _devices(module: nn.Module) -> list[str]:
    return sorted({p.device.type for p in module.parameters()})


def _consistent(values: list[bool | Irregular]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    return False if all(v is False for v in values) else "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapted layer and saved module, as PEFT's."""
    inner, enabled, active = _adapted(model)
    merged = set(merged_adapters(inner))
    found: list[TunerLayerStatus] = []
    for path, layer in target_layers(inner):
        branches = [c for c in layer.children() if isinstance(c, Branch)]
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        devices: dict[str, set[str]] = collections.defaultdict(set)
        for branch in branches:
            for p in branch.parameters():
                grads[branch.adapter].append(p.requires_grad)
                devices[branch.adapter].add(p.device.type)
        method = branches[0].method if branches else "lora"
        found.append(
            TunerLayerStatus(
                name=f"model.{path}",
                module_type=f"{method}.{type(layer).__name__}",
                enabled=enabled,
                active_adapters=active,
                merged_adapters=[b.adapter for b in branches if b.adapter in merged],
                requires_grad={k: _uniform(v) for k, v in grads.items()},
                available_adapters=sorted(b.adapter for b in branches),
                devices={k: sorted(v) for k, v in devices.items()},
                quantization_backend=None,
            )
        )
    for path, wrapper in saved_modules(inner):
        copies = dict(wrapper.modules_to_save.items())
        found.append(
            TunerLayerStatus(
                name=f"model.{path}",
                module_type="ModulesToSaveWrapper",
                enabled=enabled,
                active_adapters=active,
                merged_adapters=[],
                requires_grad={
                    k: _uniform([p.requires_grad for p in m.parameters()])
                    for k, m in copies.items()
                },
                available_adapters=sorted(copies),
                devices={
                    k: sorted({p.device.type for p in m.parameters()}) for k, m in copies.items()
                },
                quantization_backend=None,
            )
        )
    if not found:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that "
            "you have PEFT adapters injected in the model."
        )
    return found


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """PEFT's summary of :func:`get_layer_status` over the whole model."""
    layers = get_layer_status(model)
    inner, _, _ = _adapted(model)
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "peft_config"):
        base_type, adapter_type = type(inner).__name__, type(base).__name__
        peft_types = {
            k: str(getattr(c.peft_type, "value", c.peft_type)) for k, c in base.peft_config.items()
        }
    else:
        base_type, adapter_type = "other", "None"
        peft_types = {}
    trainable, total = trainable_parameters(model)
    enabled_set = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_all = {a for s in layers for a in s.merged_adapters}
    merged: list[str] | Irregular = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, d in s.devices.items():
            devices[k].update(d)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled_set.pop() if len(enabled_set) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={k: _consistent(v) for k, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=None,
    )
