"""Target selection in PEFT's configs, for every method: ``target_modules`` and friends.

PEFT's overloaded fields are split here and nowhere else: ``target_modules`` as a list
becomes ``targets: {kind: names}``, as a string ``{kind: regex}`` (or ``all-linear``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptc.spec.fields import (
    AllLinearTargets,
    NameTargets,
    NoTargets,
    RegexTargets,
    TypeTargets,
)

__all__ = ["PEFT_KEYS", "SELECTION_KEYS", "selection_from_peft", "selection_to_peft"]

# spec field -> the PEFT key it comes from
PEFT_KEYS = {
    "targets": "target_modules",
    "exclude": "exclude_modules",
    "layers": "layers_to_transform",
}
SELECTION_KEYS = (
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)


def selection_to_peft(adapter: Any, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's selection keys for ``adapter`` (which has ``targets``, ``exclude``, ``layers``
    and ``modules_to_save``); ``target_modules`` overrides the targets (the compiler passes
    the resolved names for selectors PEFT cannot express, such as ``kind: types``)."""
    cfg: dict[str, Any] = {}
    a = adapter
    if target_modules is not None:
        cfg["target_modules"] = sorted(target_modules)
    elif isinstance(a.targets, NameTargets):
        cfg["target_modules"] = sorted(a.targets.names)
    elif isinstance(a.targets, NoTargets):
        cfg["target_modules"] = []
    elif isinstance(a.targets, RegexTargets):
        cfg["target_modules"] = a.targets.pattern
    elif isinstance(a.targets, AllLinearTargets):
        if a.layers is not None:  # PEFT refuses layers_to_transform with "all-linear"
            raise ValueError(
                "targets 'all-linear' with layers has no PEFT equivalent: compile the spec "
                "onto a model (the saved adapter_config.json lists the resolved module names)"
            )
        cfg["target_modules"] = "all-linear"
    elif isinstance(a.targets, TypeTargets):
        raise ValueError(
            "targets of kind 'types' have no PEFT equivalent: compile the spec onto a model "
            "(the saved adapter_config.json lists the resolved module names)"
        )
    if isinstance(a.exclude, NameTargets):
        cfg["exclude_modules"] = sorted(a.exclude.names)
    elif isinstance(a.exclude, RegexTargets):
        cfg["exclude_modules"] = a.exclude.pattern
    if a.modules_to_save:
        cfg["modules_to_save"] = list(a.modules_to_save)
    if a.layers is not None:
        cfg["layers_to_transform"] = list(a.layers.indices)
        pattern = a.layers.pattern
        if pattern is not None:
            cfg["layers_pattern"] = pattern[0] if len(pattern) == 1 else list(pattern)
    return cfg


def selection_from_peft(cfg: Mapping[str, Any], adapter: dict[str, Any]) -> None:
    """Put the spec form of ``cfg``'s selection keys into ``adapter``."""
    value = cfg.get("target_modules")
    if value is not None:
        adapter["targets"] = _selector(value, allow_all_linear=True)
    value = cfg.get("exclude_modules")
    if value:
        adapter["exclude"] = _selector(value, allow_all_linear=False)
        targets, exclude = adapter.get("targets"), adapter["exclude"]
        if targets and targets["kind"] == exclude["kind"] == "names":  # peft: exclusion wins
            names = [n for n in targets["names"] if n not in set(exclude["names"])]
            adapter["targets"] = {"kind": "names", "names": names}
    value = cfg.get("modules_to_save")
    if value is not None:  # peft writes its task heads twice (["classifier",
        adapter["modules_to_save"] = _unique(value)  # "classifier", "score"])
    value = cfg.get("layers_to_transform")
    if value is not None:
        adapter["layers"] = {"indices": [value] if isinstance(value, int) else value}
        if cfg.get("layers_pattern"):
            pattern = cfg["layers_pattern"]
            adapter["layers"]["pattern"] = [pattern] if isinstance(pattern, str) else pattern


def _selector(value: Any, *, allow_all_linear: bool) -> Any:
    if isinstance(value, str):
        if allow_all_linear and value == "all-linear":
            return {"kind": "all-linear"}
        return {"kind": "regex", "pattern": value}
    if isinstance(value, (list, tuple, set, frozenset)) and not value:
        return {"kind": "none"}  # PEFT's "no module" (with target_parameters)
    # PEFT keeps a list as a set (written in arbitrary order): sort for a stable spec
    return {"kind": "names", "names": _as_list(value)}


def _as_list(value: Any) -> Any:
    if isinstance(value, (set, frozenset, list, tuple)) and all(isinstance(v, str) for v in value):
        return sorted(value)
    return value


def _unique(value: Any) -> Any:
    """A list of names without repeats, in first-seen order (other values: as they are)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(dict.fromkeys(value))
    return _as_list(value)
