"""The docs stay in step with the code: field reference, PEFT mapping, README commands."""

from __future__ import annotations

import dataclasses
import re

import peft

from adaptc.spec.docs import BEGIN_MARKER, END_MARKER, field_reference
from adaptc.spec.schema import json_schema
from tests.conftest import ROOT

SPEC_DOC = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")


def test_field_reference_in_docs_is_fresh():
    block = SPEC_DOC.split(BEGIN_MARKER, 1)[1].split(END_MARKER, 1)[0].strip()
    assert block == field_reference().strip(), (
        "docs/spec.md's field reference is stale: paste `adaptc schema --format markdown`"
    )


def test_every_schema_field_is_documented():
    schema = json_schema()
    for model in [schema, *schema["$defs"].values()]:
        for field in model.get("properties", {}):
            assert f"| `{field}` |" in SPEC_DOC, f"{field} is missing from docs/spec.md"


def test_peft_mapping_table_covers_every_lora_config_field():
    table = SPEC_DOC.split("## PEFT `LoraConfig` → spec", 1)[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - documented == set(), "LoraConfig fields missing from the mapping table"


def test_readme_shows_exactly_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^make \w+", readme, flags=re.M)
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_docs_index_links_resolve():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for link in re.findall(r"\]\(([^)#]+)\)", index):
        assert (ROOT / "docs" / link).is_file(), link
