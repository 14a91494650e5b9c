"""docs/peft-migration.md lists every public name of PEFT with its status in adaptc, and
what it says is supported exists in ``adaptc.peft``."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import peft.peft_model as peft_models
import pytest

import adaptc.peft as ap

DOC = Path(__file__).parents[2] / "docs" / "peft-migration.md"
STATUSES = ("supported", "different", "not yet")


def _rows(section: str) -> dict[str, str]:
    """``{name: status}`` of the table under the ``###`` heading starting with ``section``."""
    text = DOC.read_text(encoding="utf-8")
    part = text.split(f"### {section}", 1)[1].split("\n### ", 1)[0]
    rows: dict[str, str] = {}
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[1].startswith(STATUSES):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def _public(cls: type) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("_")}


TABLES = {
    "Functions": ("`peft.__all__`", set(peft.__all__), ap),
    "`PeftModel`": (
        "PeftModel and its task classes",
        set().union(*(_public(getattr(peft_models, n)) for n in dir(peft_models)
                      if n.startswith("PeftModel") and isinstance(getattr(peft_models, n), type))),
        ap.PeftModelForCausalLM,
    ),
    "`LoraModel`": (
        "LoraModel and BaseTuner",
        _public(peft.LoraModel) | _public(peft.tuners.tuners_utils.BaseTuner),
        ap.LoraModel,
    ),
    "`LoraConfig`": (
        "LoraConfig and PeftConfig",
        _public(peft.LoraConfig) | _public(peft.config.PeftConfig)
        | _public(peft.config.PeftConfigMixin),
        ap.LoraConfig,
    ),
}  # fmt: skip


@pytest.mark.parametrize("section", list(TABLES))
def test_every_public_peft_name_is_listed(section):
    what, names, _ = TABLES[section]
    rows = _rows(section)
    missing = sorted(names - set(rows))
    assert not missing, f"docs/peft-migration.md does not list these names of {what}: {missing}"


@pytest.mark.parametrize("section", list(TABLES))
def test_names_said_to_work_exist(section):
    owner = TABLES[section][2]
    said = [n for n, status in _rows(section).items() if not status.startswith("not yet")]
    absent = [n for n in said if not hasattr(owner, n) and not _is_field(owner, n)]
    assert not absent, f"marked supported in docs/peft-migration.md but missing: {absent}"


def _is_field(owner: object, name: str) -> bool:
    fields = getattr(owner, "__dataclass_fields__", {})
    return name in fields or (owner is ap.PeftModelForCausalLM and name == "peft_config")
