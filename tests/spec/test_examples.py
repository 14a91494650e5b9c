"""The shipped example specs validate and say what their names promise."""

from __future__ import annotations

import pytest

from adaptc.spec import (
    AllLinearTargets,
    NameTargets,
    RegexTargets,
    TypeTargets,
    check_file,
    load_spec,
)
from tests.conftest import EXAMPLES

FILES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".json"))
SCHEMA_LINE = "# yaml-language-server: $schema=../../schemas/adapter-spec.v1.json"


def test_examples_required_by_the_project_exist():
    names = {p.name for p in FILES}
    assert {"seed-mt0-large.yaml", "seed-opt-350m.yaml", "seed-custom-dummy.yaml"} <= names
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_is_valid(path):
    assert check_file(path) == []


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".yaml"], ids=lambda p: p.name)
def test_yaml_example_points_editors_at_the_schema(path):
    assert path.read_text().splitlines()[0] == SCHEMA_LINE


def test_seed_mt0_large_matches_the_seed_config():
    spec = load_spec(EXAMPLES / "seed-mt0-large.yaml")
    a = spec.adapter()
    assert spec.task_type == "SEQ_2_SEQ_LM"
    assert (a.r, a.lora_alpha, a.lora_dropout) == (8, 32, 0.1)
    assert a.targets is None  # PEFT's defaults for mt5


def test_seed_opt_350m_targets_q_and_v():
    spec = load_spec(EXAMPLES / "seed-opt-350m.yaml")
    assert spec.task_type == "CAUSAL_LM"
    assert spec.adapter().targets == NameTargets(kind="names", names=("q_proj", "v_proj"))


def test_seed_custom_dummy_matches_the_seed_config():
    a = load_spec(EXAMPLES / "seed-custom-dummy.yaml").adapter()
    assert (a.r, a.lora_alpha, a.lora_dropout, a.bias) == (64, 16, 0.1, "none")
    assert a.targets == NameTargets(kind="names", names=("linear",))


def test_feature_examples_use_their_feature():
    def adapter(name):
        return load_spec(EXAMPLES / name).adapter()

    assert isinstance(adapter("llama-all-linear.yaml").targets, AllLinearTargets)
    assert adapter("llama-rslora.yaml").use_rslora
    assert adapter("llama-dora.yaml").use_dora
    patterns = adapter("opt-rank-alpha-patterns.yaml")
    assert patterns.rank_pattern and patterns.alpha_pattern
    assert isinstance(patterns.targets, RegexTargets)
    layers = adapter("llama-layer-selection.yaml").layers
    assert layers is not None and layers.indices == (12, 13, 14, 15)
    assert adapter("bert-seq-cls-modules-to-save.yaml").modules_to_save == ("classifier",)
    assert isinstance(adapter("gpt2-conv1d-types.yaml").targets, TypeTargets)
    pissa = adapter("pissa-init.yaml")
    assert (pissa.init, pissa.pissa_niter) == ("pissa", 4)
    assert load_spec(EXAMPLES / "merged-inference.json").merge
    assert adapter("llama-layer-replication.yaml").layer_replication == ((0, 12), (4, 16))
    experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    assert adapter("qwen3-moe-experts.yaml").target_parameters == experts


def test_yaml_merge_keys_share_settings_between_adapters():
    spec = load_spec(EXAMPLES / "multi-adapter-shared.yaml")
    first, second = spec.adapters["summarise"], spec.adapters["translate"]
    assert first.targets == second.targets
    assert (first.r, second.r) == (8, 16)  # explicit keys win over merged ones
    assert (first.init, second.init) == ("default", "gaussian")
