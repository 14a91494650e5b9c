"""Conversion between adaptc specs and PEFT's ``adapter_config.json`` (``LoraConfig``).

PEFT's overloaded fields are split here and nowhere else: ``target_modules`` as a list
becomes ``targets: {kind: names}``, as a string ``{kind: regex}`` (or ``all-linear``);
``init_lora_weights`` True/False/``pissa_niter_N`` becomes ``init`` (+ ``pissa_niter``).
Options adaptc does not implement are refused by name instead of being dropped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from adaptc.spec.errors import SpecError, SpecIssue, issues_from_validation_error
from adaptc.spec.model import AllLinearTargets, NameTargets, RegexTargets, Spec, TypeTargets

__all__ = ["PEFT_FORMAT_VERSION", "from_peft_config", "is_peft_config", "to_peft_config"]

PEFT_FORMAT_VERSION = "0.21.2"

# LoraConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "LORA",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# Keys copied one to one between the two formats.
_SAME = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
)
# Keys that describe the run, not the adapter; read elsewhere or not at all.
_IGNORED = {"peft_type", "peft_version", "auto_mapping", "inference_mode", "megatron_core"}
_IGNORED |= {"qalora_group_size", "runtime_config", "task_type", "base_model_name_or_path"}
_IGNORED |= {"revision"}
# Where a spec field came from in a PEFT file, to point errors at the right key.
_FIELD_TO_PEFT = {
    "targets": "target_modules",
    "exclude": "exclude_modules",
    "init": "init_lora_weights",
    "pissa_niter": "init_lora_weights",
    "layers": "layers_to_transform",
}
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def is_peft_config(data: Any) -> bool:
    """True for a mapping that looks like PEFT's ``adapter_config.json``."""
    return isinstance(data, Mapping) and "peft_type" in data and "adapters" not in data


def to_peft_config(
    spec: Spec,
    adapter: str | None = None,
    *,
    target_modules: list[str] | None = None,
    inference_mode: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT would write for one adapter of ``spec``.

    ``target_modules`` overrides the targets (the compiler passes the resolved names for
    selectors PEFT cannot express, such as ``kind: types``).
    """
    a = spec.adapter(adapter)
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    cfg["task_type"] = spec.task_type
    cfg["inference_mode"] = inference_mode
    if spec.base_model is not None:
        cfg["base_model_name_or_path"] = spec.base_model.name
        cfg["revision"] = spec.base_model.revision
    for key in _SAME:
        value = getattr(a, key)
        cfg[key] = dict(value) if isinstance(value, Mapping) else value
    if target_modules is not None:
        cfg["target_modules"] = sorted(target_modules)
    elif isinstance(a.targets, NameTargets):
        cfg["target_modules"] = sorted(a.targets.names)
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
    cfg["init_lora_weights"] = {"default": True, "random": False}.get(a.init, a.init)
    if a.pissa_niter is not None:
        cfg["init_lora_weights"] = f"pissa_niter_{a.pissa_niter}"
    if a.layers is not None:
        cfg["layers_to_transform"] = list(a.layers.indices)
        pattern = a.layers.pattern
        if pattern is not None:
            cfg["layers_pattern"] = pattern[0] if len(pattern) == 1 else list(pattern)
    return cfg


def from_peft_config(cfg: Mapping[str, Any], name: str = "default", doc: Any | None = None) -> Spec:
    """A one-adapter :class:`Spec` from PEFT's config dict; unsupported options are errors."""
    issues: list[SpecIssue] = []

    def bad(key: str, message: str) -> None:
        if doc is not None:
            issues.append(doc.issue((key,), key, message, key=True))
        else:
            issues.append(SpecIssue(None, None, None, key, message))

    if cfg.get("peft_type") != "LORA":
        bad(
            "peft_type",
            f"peft_type {cfg.get('peft_type')!r} is not supported by adaptc (only LORA)",
        )
    adapter: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in _IGNORED or key in ("layers_pattern",):
            continue
        if key in _SAME:
            adapter[key] = {} if value is None and key.endswith("pattern") else value
        elif key == "target_modules":
            if value is not None:
                adapter["targets"] = _selector(value, allow_all_linear=True)
        elif key == "exclude_modules":
            if value:
                adapter["exclude"] = _selector(value, allow_all_linear=False)
        elif key == "modules_to_save":
            if value is not None:  # peft writes its task heads twice (["classifier",
                adapter["modules_to_save"] = _unique(value)  # "classifier", "score"])
        elif key == "init_lora_weights":
            _init(value, adapter, bad)
        elif key == "layers_to_transform":
            if value is not None:
                adapter["layers"] = {"indices": [value] if isinstance(value, int) else value}
                if cfg.get("layers_pattern"):
                    pattern = cfg["layers_pattern"]
                    adapter["layers"]["pattern"] = (
                        [pattern] if isinstance(pattern, str) else pattern
                    )
        elif value not in (None, False, {}, [], "") and value != _PEFT_DEFAULTS.get(key):
            bad(key, f"{key!r} is not supported by adaptc")
    if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
        bad("layers_pattern", "layers_pattern needs layers_to_transform")
    data: dict[str, Any] = {"version": 1, "adapters": {name: adapter}}
    if cfg.get("task_type") is not None:
        data["task_type"] = cfg["task_type"]
    if cfg.get("base_model_name_or_path"):
        data["base_model"] = {"name": cfg["base_model_name_or_path"]}
        if cfg.get("revision"):
            data["base_model"]["revision"] = cfg["revision"]
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        for issue in issues_from_validation_error(exc, Spec):
            key = _peft_key(issue.field, name)
            if doc is not None:
                issues.append(doc.issue((key,), key, issue.message))
            else:
                issues.append(SpecIssue(None, None, None, key, issue.message))
    if issues:
        raise SpecError(sorted(issues, key=lambda i: (i.line or 0, i.column or 0)))
    return spec


def _selector(value: Any, *, allow_all_linear: bool) -> Any:
    if isinstance(value, str):
        if allow_all_linear and value == "all-linear":
            return {"kind": "all-linear"}
        return {"kind": "regex", "pattern": value}
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


def _init(value: Any, adapter: dict[str, Any], bad: Any) -> None:
    if value is True:
        return
    if value is False:
        adapter["init"] = "random"
    elif value in ("gaussian", "pissa", "olora"):
        adapter["init"] = value
    elif isinstance(value, str) and _PISSA_NITER.fullmatch(value):
        adapter["init"] = "pissa"
        adapter["pissa_niter"] = int(value.rsplit("_", 1)[1])
    else:
        bad("init_lora_weights", f"init_lora_weights={value!r} is not supported by adaptc")


def _peft_key(spec_field: str, name: str) -> str:
    """``adapters.default.targets.names`` → ``target_modules``."""
    parts = spec_field.split(".")
    if parts[:2] == ["adapters", name] and len(parts) > 2:
        return _FIELD_TO_PEFT.get(parts[2], parts[2])
    if parts[0] == "base_model":
        return "base_model_name_or_path"
    return parts[0]
