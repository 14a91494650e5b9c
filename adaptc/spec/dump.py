"""Writing specs back out as YAML or JSON."""

from __future__ import annotations

import io
import json

from ruamel.yaml import YAML

from adaptc.spec.model import Spec

__all__ = ["dump_spec"]


def dump_spec(spec: Spec, fmt: str = "yaml", *, schema_ref: str | None = None) -> str:
    """The spec as text; only fields that differ from their defaults are written."""
    data = spec.to_dict()
    if fmt == "json":
        if schema_ref:
            data = {"$schema": schema_ref, **data}
        return json.dumps(data, indent=2) + "\n"
    if fmt != "yaml":
        raise ValueError(f"unknown format {fmt!r}; expected 'yaml' or 'json'")
    data.pop("$schema", None)
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = None  # short lists inline, mappings as blocks
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    buf = io.StringIO()
    yaml.dump(data, buf)
    header = f"# yaml-language-server: $schema={schema_ref}\n" if schema_ref else ""
    return header + buf.getvalue()
