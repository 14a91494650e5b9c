"""The JSON Schema of the spec, generated from the pydantic models."""

from __future__ import annotations

import json
from typing import Any

from adaptc.spec.model import Spec

__all__ = ["SCHEMA_ID", "json_schema", "json_schema_text"]

SCHEMA_ID = "urn:adaptc:adapter-spec:v1"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that editors and ``jsonschema`` check specs with."""
    schema = Spec.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
    }


def json_schema_text() -> str:
    """The schema as committed in ``schemas/adapter-spec.v1.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
