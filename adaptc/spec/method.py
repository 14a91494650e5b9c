"""The spec side of the method registry: each method's spec model and PEFT conversion.

Each name in :data:`adaptc.methods.NAMES` has a module ``adaptc.methods.<name>.spec``
exposing ``SPEC``, a :class:`MethodSpec`. Those modules belong to the spec layer: they
import :mod:`adaptc.spec.fields` (and :mod:`adaptc.spec.peft_targets`) only, so a spec
validates without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import BaseModel

from adaptc.methods import NAMES

__all__ = ["PEFT_FORMAT_VERSION", "Bad", "MethodSpec", "method_spec", "method_specs", "peft_method"]

PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose files adaptc writes

Bad = Callable[[str, str], None]  # bad(PEFT key, message): report a refused PEFT option


@dataclass(frozen=True)
class MethodSpec:
    """One method as the spec knows it."""

    name: str  # the spec's `method` value
    model: type[BaseModel]  # one adapter's settings; its `method` field is Literal[name]
    peft_type: str  # PEFT's `peft_type` for this method, e.g. "LORA"
    # PEFT config (the whole adapter_config.json) -> the adapter's spec fields (unvalidated)
    from_peft: Callable[[Mapping[str, Any], Bad], dict[str, Any]]
    # (adapter settings, resolved target names or None) -> PEFT's config in its key order;
    # the envelope keys (task_type, base_model_name_or_path, …) are filled in by the caller
    to_peft: Callable[[Any, list[str] | None], dict[str, Any]]
    # a spec field of the adapter -> the PEFT key it came from (to locate errors)
    peft_keys: Mapping[str, str] = field(default_factory=dict)
    # whether PEFT's config has layers_to_transform (else a spec's `layers` is written as
    # the resolved module paths)
    peft_has_layers: bool = True


@cache
def method_specs() -> tuple[MethodSpec, ...]:
    """Every registered method, in :data:`adaptc.methods.NAMES` order."""
    found = []
    for name in NAMES:
        entry = importlib.import_module(f"adaptc.methods.{name}.spec").SPEC
        assert isinstance(entry, MethodSpec) and entry.name == name, name
        found.append(entry)
    return tuple(found)


def method_spec(name: str) -> MethodSpec:
    for entry in method_specs():
        if entry.name == name:
            return entry
    raise KeyError(f"unknown method {name!r} (known: {', '.join(NAMES)})")


def peft_method(peft_type: Any) -> MethodSpec | None:
    """The method whose PEFT ``peft_type`` this is, or None."""
    for entry in method_specs():
        if entry.peft_type == peft_type:
            return entry
    return None
