"""Conversion between adaptc specs and PEFT's ``adapter_config.json``.

The envelope (``peft_type``, ``task_type``, ``base_model_name_or_path``, ``revision``,
``inference_mode``) is read and written here; the adapter's own keys by its method's
conversion (``adaptc/methods/<name>/spec.py``), chosen by ``peft_type``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from adaptc.spec.errors import SpecError, SpecIssue, issues_from_validation_error
from adaptc.spec.method import PEFT_FORMAT_VERSION, method_specs, peft_method
from adaptc.spec.model import Spec

__all__ = ["PEFT_FORMAT_VERSION", "from_peft_config", "is_peft_config", "to_peft_config"]


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
    """The ``adapter_config.json`` PEFT would write for one adapter of ``spec``
    (:meth:`Spec.to_peft_config`)."""
    return spec.to_peft_config(
        adapter, target_modules=target_modules, inference_mode=inference_mode
    )


def from_peft_config(cfg: Mapping[str, Any], name: str = "default", doc: Any | None = None) -> Spec:
    """A one-adapter :class:`Spec` from PEFT's config dict; unsupported options are errors."""
    issues: list[SpecIssue] = []

    def bad(key: str, message: str) -> None:
        if doc is not None:
            issues.append(doc.issue((key,), key, message, key=True))
        else:
            issues.append(SpecIssue(None, None, None, key, message))

    method = peft_method(cfg.get("peft_type"))
    if method is None:
        known = ", ".join(m.peft_type for m in method_specs())
        bad(
            "peft_type",
            f"peft_type {cfg.get('peft_type')!r} is not supported by adaptc (supported: {known})",
        )
        adapter: dict[str, Any] = {}
    else:
        adapter = method.from_peft(cfg, bad)
    data: dict[str, Any] = {"version": 1, "adapters": {name: adapter}}
    if cfg.get("task_type") is not None:
        data["task_type"] = cfg["task_type"]
    if cfg.get("base_model_name_or_path"):
        data["base_model"] = {"name": cfg["base_model_name_or_path"]}
        if cfg.get("revision"):
            data["base_model"]["revision"] = cfg["revision"]
    if method is not None:
        try:
            spec = Spec.model_validate(data)
        except ValidationError as exc:
            for issue in issues_from_validation_error(exc, Spec):
                key = _peft_key(issue.field, name, method.peft_keys)
                if doc is not None:
                    issues.append(doc.issue((key,), key, issue.message))
                else:
                    issues.append(SpecIssue(None, None, None, key, issue.message))
    if issues:
        raise SpecError(sorted(issues, key=lambda i: (i.line or 0, i.column or 0)))
    return spec


def _peft_key(spec_field: str, name: str, keys: Mapping[str, str]) -> str:
    """``adapters.default.targets.names`` → ``target_modules``."""
    parts = spec_field.split(".")
    if parts[:2] == ["adapters", name] and len(parts) > 2:
        return keys.get(parts[2], parts[2])
    if parts[0] == "base_model":
        return "base_model_name_or_path"
    return parts[0]
