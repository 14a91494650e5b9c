"""The JSON Schema is generated, committed, fresh, and agrees with adaptc's own checks."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from adaptc.spec import SpecError, is_peft_config, spec_from_data
from adaptc.spec.schema import json_schema, json_schema_text
from adaptc.spec.source import read_document
from tests.conftest import BAD_SPECS, EXAMPLES, ROOT

SCHEMA_FILE = ROOT / "schemas" / "adapter-spec.v1.json"
VALIDATOR = jsonschema.Draft202012Validator(json_schema())
EXPECTED = YAML(typ="safe").load((BAD_SPECS / "expected.yaml").read_text(encoding="utf-8"))
BEYOND_SCHEMA_RULES = {
    "lora-bias-dora",
    "lora-bias-init",
    "mica-dora",
    "pissa-niter-init",
    "init-settings",
    "layers-regex",
    "exclude-overlap",
    "save-overlap",
    "regex-valid",
    "regex-backtracking",
    "finite-numbers",
    "version-integer",
    "replication-range",
    "replication-init",
    "replication-adapters",
    "tokens-save-overlap",
}


def _adaptc_accepts(data: Any) -> bool:
    try:
        spec_from_data(data)
    except SpecError:
        return False
    return True


def test_committed_schema_is_fresh():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text(), (
        "schemas/adapter-spec.v1.json is stale: run `make schema`"
    )


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(json_schema())


def _parsed_corpus() -> list[tuple[str, Any, str | None]]:
    """(name, data, beyond_schema rule) for every corpus file that parses to adaptc data."""
    cases: list[tuple[str, Any, str | None]] = []
    for path in sorted(EXAMPLES.iterdir()):
        cases.append((f"good/{path.name}", read_document(path).data, None))
    for name, expected in EXPECTED.items():
        try:
            data = read_document(BAD_SPECS / name).data
        except SpecError:
            continue  # not YAML/JSON data at all: nothing for a schema to look at
        if not is_peft_config(data):
            cases.append((f"bad/{name}", data, expected.get("beyond_schema")))
    return cases


CORPUS = _parsed_corpus()


@pytest.mark.parametrize(("name", "data", "rule"), CORPUS, ids=[c[0] for c in CORPUS])
def test_jsonschema_and_adaptc_agree_on_the_corpus(name, data, rule):
    ours = _adaptc_accepts(data)
    assert ours == name.startswith("good/")
    if rule is None:
        assert VALIDATOR.is_valid(data) == ours
    else:  # a rule JSON Schema cannot express: jsonschema accepts, adaptc refuses
        assert rule in BEYOND_SCHEMA_RULES
        assert VALIDATOR.is_valid(data) and not ours


def _mutations(data: dict[str, Any]):
    """Single-field breakages of a good spec, each of which JSON Schema can see."""
    name = next(iter(data["adapters"]))

    def mutate(fn):
        d = copy.deepcopy(data)
        fn(d, d["adapters"][name])
        return d

    yield "no-version", mutate(lambda d, a: d.pop("version"))
    yield "version-2", mutate(lambda d, a: d.update(version=2))
    yield "version-str", mutate(lambda d, a: d.update(version="1"))
    yield "unknown-top", mutate(lambda d, a: d.update(extra=1))
    yield "unknown-adapter-field", mutate(lambda d, a: a.update(lora_alph=1))
    yield "r-zero", mutate(lambda d, a: a.update(r=0))
    yield "r-float", mutate(lambda d, a: a.update(r=8.5))
    yield "r-bool", mutate(lambda d, a: a.update(r=True))
    yield "alpha-str", mutate(lambda d, a: a.update(lora_alpha="16"))
    yield "dropout-1", mutate(lambda d, a: a.update(lora_dropout=1))
    yield "bias-bad", mutate(lambda d, a: a.update(bias="some"))
    yield "init-bad", mutate(lambda d, a: a.update(init="corda"))
    yield "targets-list", mutate(lambda d, a: a.update(targets=["q"]))
    yield "targets-kind", mutate(lambda d, a: a.update(targets={"kind": "nope"}))
    yield "targets-empty", mutate(lambda d, a: a.update(targets={"kind": "names", "names": []}))
    yield "name-bad", mutate(lambda d, a: d["adapters"].update({"a b": {}}))
    yield "name-reserved", mutate(lambda d, a: d["adapters"].update({"__base__": {}}))
    yield "save-dup", mutate(lambda d, a: a.update(modules_to_save=["x", "x"]))
    yield "rank-pattern-0", mutate(lambda d, a: a.update(rank_pattern={"q": 0}))
    yield "merge-str", mutate(lambda d, a: d.update(merge="yes"))
    yield "task-bad", mutate(lambda d, a: d.update(task_type="LM"))
    yield "layers-empty", mutate(lambda d, a: a.update(layers={"indices": []}))
    yield "adapters-empty", mutate(lambda d, a: d.update(adapters={}))


MUTATED = [
    (f"{path.name}/{label}", data)
    for path in sorted(EXAMPLES.iterdir())
    for label, data in _mutations(read_document(path).data)
]


@pytest.mark.parametrize(("name", "data"), MUTATED, ids=[m[0] for m in MUTATED])
def test_jsonschema_and_adaptc_both_refuse_each_mutation(name, data):
    assert not _adaptc_accepts(data)
    assert not VALIDATOR.is_valid(data)


def test_rules_beyond_the_schema_are_documented():
    text = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    section = text.split("## Rules across fields", 1)[1].split("## Errors", 1)[0]
    for rule in BEYOND_SCHEMA_RULES:
        assert f"`{rule}`" in section


def test_schema_has_descriptions_for_every_field():
    schema = json_schema()
    models = [schema, *schema["$defs"].values()]
    for model in models:
        for field, prop in model.get("properties", {}).items():
            assert prop.get("description"), f"{model.get('title')}.{field} has no description"


def test_schema_cli_output_is_the_committed_file(capsys):
    from adaptc.cli import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SCHEMA_FILE.read_text())
