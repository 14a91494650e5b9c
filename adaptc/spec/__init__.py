"""The spec language: models, loading with located errors, PEFT conversion."""

from adaptc.spec.compile_options import CompileOptions
from adaptc.spec.errors import SpecError, SpecIssue, SpecWarning
from adaptc.spec.load import FileReport, check_file, check_file_report, load_spec, spec_from_data
from adaptc.spec.model import (
    AllLinearTargets,
    BaseModelRef,
    LayerSelection,
    LoraAdapter,
    NameTargets,
    NoTargets,
    RegexTargets,
    Spec,
    TypeTargets,
)
from adaptc.spec.peft_config import from_peft_config, is_peft_config, to_peft_config
from adaptc.spec.schema import json_schema

__all__ = [
    "AllLinearTargets",
    "BaseModelRef",
    "CompileOptions",
    "FileReport",
    "LayerSelection",
    "LoraAdapter",
    "NameTargets",
    "NoTargets",
    "RegexTargets",
    "Spec",
    "SpecError",
    "SpecIssue",
    "SpecWarning",
    "TypeTargets",
    "check_file",
    "check_file_report",
    "from_peft_config",
    "is_peft_config",
    "json_schema",
    "load_spec",
    "spec_from_data",
    "to_peft_config",
]
