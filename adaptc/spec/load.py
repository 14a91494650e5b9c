"""``load_spec``: one entry point for every form a spec comes in."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adaptc.spec.errors import SpecError, SpecIssue, SpecWarning, issues_from_validation_error
from adaptc.spec.model import Spec
from adaptc.spec.peft_config import from_peft_config, is_peft_config
from adaptc.spec.source import Document, read_document

__all__ = [
    "PEFT_CONFIG_NAME",
    "SPEC_FILE_NAME",
    "FileReport",
    "SpecSource",
    "check_file",
    "check_file_report",
    "load_spec",
    "resolve_spec_path",
    "spec_from_data",
]

SPEC_FILE_NAME = "adaptc_spec.yaml"
PEFT_CONFIG_NAME = "adapter_config.json"

SpecSource = str | Path | Mapping[str, Any] | Spec


def load_spec(source: SpecSource | Any) -> Spec:
    """Load and validate a spec.

    ``source`` is a :class:`Spec`; a path to a YAML or JSON spec; a path to PEFT's
    ``adapter_config.json``; an adapter directory (holding ``adaptc_spec.yaml`` or
    ``adapter_config.json``); a dict in either format; or a ``peft.LoraConfig``.
    Raises :class:`SpecError` listing every problem, each with its file position. What
    deserves a look but is no error (a reused YAML anchor) is a :class:`SpecWarning`.
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, (str, Path)):
        doc = read_document(resolve_spec_path(Path(source)))
        for issue in doc.warnings:
            warnings.warn(SpecWarning(issue), stacklevel=2)
        return _from_document(doc)
    if isinstance(source, Mapping):
        return spec_from_data(dict(source))
    if hasattr(source, "peft_type") and hasattr(source, "to_dict"):  # a peft.LoraConfig
        return from_peft_config(source.to_dict())
    raise TypeError(
        f"load_spec takes a path, a dict, a Spec or a PEFT LoraConfig, not {type(source).__name__}"
    )


@dataclass(frozen=True)
class FileReport:
    """What checking one spec file found: its errors (none when valid) and its warnings."""

    errors: tuple[SpecIssue, ...]
    warnings: tuple[SpecIssue, ...] = ()


def check_file_report(path: str | Path) -> FileReport:
    """Every error and warning in one spec file."""
    try:
        doc = read_document(path)
    except SpecError as exc:
        return FileReport(exc.issues)
    try:
        _from_document(doc)
    except SpecError as exc:
        return FileReport(exc.issues, tuple(doc.warnings))
    return FileReport((), tuple(doc.warnings))


def check_file(path: str | Path) -> list[SpecIssue]:
    """Every problem in one spec file (empty when it is valid)."""
    return list(check_file_report(path).errors)


def spec_from_data(data: Any, doc: Document | None = None) -> Spec:
    """Validate already-parsed data (adaptc or PEFT format)."""

    def fail(message: str) -> SpecError:
        issue = (
            doc.issue((), "(root)", message)
            if doc
            else SpecIssue(None, None, None, "(root)", message)
        )
        return SpecError([issue])

    if not isinstance(data, Mapping):
        raise fail(f"expected a mapping at the top level, got {type(data).__name__}")
    if is_peft_config(data):
        return from_peft_config(data, doc=doc)
    foreign = _not_a_spec(data)
    if foreign:
        raise fail(foreign)
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(issues_from_validation_error(exc, Spec, doc)) from None


def _not_a_spec(data: Mapping[Any, Any]) -> str | None:
    """Why ``data`` is some other file (a CI workflow, a package.json), or None.

    A mapping is taken for a spec when it has ``adapters``, ``version: 1``, or a key that is
    (or nearly is) a spec field; anything else gets one line instead of an error per key.
    """
    if "adapters" in data or (data.get("version") == 1 and type(data.get("version")) is int):
        return None
    fields = [info.alias or name for name, info in Spec.model_fields.items()]
    keys = [str(k) for k in data]
    others = [k for k in keys if k != "version"]
    if not others and keys:  # `version: 2` alone: say what is wrong with the version
        return None
    if any(k in fields or difflib.get_close_matches(k, fields, n=1, cutoff=0.75) for k in others):
        return None
    shown = ", ".join(repr(k) if len(k) <= 30 else repr(k[:27] + "...") for k in keys[:5])
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    found = f"its top-level keys are {shown}{more}" if keys else "it has no 'adapters'"
    return f"not an adaptc spec: {found}; a spec has 'version: 1' and 'adapters:'"


def _from_document(doc: Document) -> Spec:
    return spec_from_data(doc.data, doc)


def resolve_spec_path(path: Path) -> Path:
    try:
        if not path.is_dir():
            return path
    except OSError:  # a name the system refuses (too long): read_document says so
        return path
    for name in (SPEC_FILE_NAME, PEFT_CONFIG_NAME):
        if (path / name).is_file():
            return path / name
    raise SpecError(
        [
            SpecIssue(
                str(path),
                None,
                None,
                "file",
                f"is a directory without {SPEC_FILE_NAME} or {PEFT_CONFIG_NAME}",
            )
        ]
    )
