"""``load_spec``: one entry point for every form a spec comes in."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adaptc.spec.errors import SpecError, SpecIssue, issues_from_validation_error
from adaptc.spec.model import Spec
from adaptc.spec.peft_config import from_peft_config, is_peft_config
from adaptc.spec.source import Document, read_document

__all__ = [
    "PEFT_CONFIG_NAME",
    "SPEC_FILE_NAME",
    "SpecSource",
    "check_file",
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
    Raises :class:`SpecError` listing every problem, each with its file position.
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, (str, Path)):
        return _from_document(read_document(resolve_spec_path(Path(source))))
    if isinstance(source, Mapping):
        return spec_from_data(dict(source))
    if hasattr(source, "peft_type") and hasattr(source, "to_dict"):  # a peft.LoraConfig
        return from_peft_config(source.to_dict())
    raise TypeError(
        f"load_spec takes a path, a dict, a Spec or a PEFT LoraConfig, not {type(source).__name__}"
    )


def check_file(path: str | Path) -> list[SpecIssue]:
    """Every problem in one spec file (empty when it is valid)."""
    try:
        _from_document(read_document(path))
    except SpecError as exc:
        return list(exc.issues)
    return []


def spec_from_data(data: Any, doc: Document | None = None) -> Spec:
    """Validate already-parsed data (adaptc or PEFT format)."""
    if not isinstance(data, Mapping):
        issue = SpecIssue(
            doc.path if doc else None,
            1 if doc else None,
            1 if doc else None,
            "(root)",
            f"expected a mapping at the top level, got {type(data).__name__}",
        )
        raise SpecError([issue])
    if is_peft_config(data):
        return from_peft_config(data, doc=doc)
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(issues_from_validation_error(exc, Spec, doc)) from None


def _from_document(doc: Document) -> Spec:
    return spec_from_data(doc.data, doc)


def resolve_spec_path(path: Path) -> Path:
    if not path.is_dir():
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
