"""Spec ⇄ PEFT ``LoraConfig``, checked against the real peft package."""

from __future__ import annotations

import json
from typing import Any

import pytest
from peft import LoraConfig, TaskType

from adaptc.spec import SpecError, from_peft_config, load_spec

# (name, adapter fields of the spec, spec top-level fields, the equivalent LoraConfig kwargs)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("defaults", {}, {}, {}),
    (
        "seed-mt0",
        {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1},
        {"task_type": "SEQ_2_SEQ_LM"},
        {
            "task_type": TaskType.SEQ_2_SEQ_LM,
            "inference_mode": False,
            "r": 8,
            "lora_alpha": 32,
            "lora_dropout": 0.1,
        },
    ),
    (
        "names",
        {"targets": {"kind": "names", "names": ["q_proj", "v_proj"]}},
        {"task_type": "CAUSAL_LM"},
        {"target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"},
    ),
    (
        "regex",
        {"targets": {"kind": "regex", "pattern": r".*\.(q|v)_proj"}},
        {},
        {"target_modules": r".*\.(q|v)_proj"},
    ),
    ("all-linear", {"targets": {"kind": "all-linear"}}, {}, {"target_modules": "all-linear"}),
    (
        "exclude-names",
        {"targets": {"kind": "all-linear"}, "exclude": {"kind": "names", "names": ["fc2"]}},
        {},
        {"target_modules": "all-linear", "exclude_modules": ["fc2"]},
    ),
    (
        "exclude-regex",
        {"targets": {"kind": "all-linear"}, "exclude": {"kind": "regex", "pattern": ".*mlp.*"}},
        {},
        {"target_modules": "all-linear", "exclude_modules": ".*mlp.*"},
    ),
    (
        "layers",
        {
            "targets": {"kind": "names", "names": ["q_proj"]},
            "layers": {"indices": [0, 2], "pattern": ["layers"]},
        },
        {},
        {"target_modules": ["q_proj"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    ),
    (
        "layers-two-patterns",
        {
            "targets": {"kind": "names", "names": ["q_proj"]},
            "layers": {"indices": [1], "pattern": ["layers", "h"]},
        },
        {},
        {
            "target_modules": ["q_proj"],
            "layers_to_transform": [1],
            "layers_pattern": ["layers", "h"],
        },
    ),
    (
        "patterns",
        {"r": 4, "rank_pattern": {"q_proj": 16}, "alpha_pattern": {r"layers\.0\.v_proj": 2.5}},
        {},
        {"r": 4, "rank_pattern": {"q_proj": 16}, "alpha_pattern": {r"layers\.0\.v_proj": 2.5}},
    ),
    ("rslora", {"use_rslora": True, "r": 64}, {}, {"use_rslora": True, "r": 64}),
    ("dora", {"use_dora": True}, {}, {"use_dora": True}),
    ("gaussian", {"init": "gaussian"}, {}, {"init_lora_weights": "gaussian"}),
    ("random", {"init": "random"}, {}, {"init_lora_weights": False}),
    ("pissa", {"init": "pissa"}, {}, {"init_lora_weights": "pissa"}),
    (
        "pissa-niter",
        {"init": "pissa", "pissa_niter": 4},
        {},
        {"init_lora_weights": "pissa_niter_4"},
    ),
    ("olora", {"init": "olora"}, {}, {"init_lora_weights": "olora"}),
    ("bias-all", {"bias": "all"}, {}, {"bias": "all"}),
    ("bias-lora-only", {"bias": "lora_only"}, {}, {"bias": "lora_only"}),
    ("lora-bias", {"lora_bias": True}, {}, {"lora_bias": True}),
    ("fan-in-fan-out", {"fan_in_fan_out": True}, {}, {"fan_in_fan_out": True}),
    (
        "modules-to-save",
        {"modules_to_save": ["classifier", "score"]},
        {"task_type": "SEQ_CLS"},
        {"modules_to_save": ["classifier", "score"], "task_type": "SEQ_CLS"},
    ),
    (
        "base-model",
        {},
        {"base_model": {"name": "facebook/opt-350m", "revision": "main"}},
        {"base_model_name_or_path": "facebook/opt-350m", "revision": "main"},
    ),
]
IDS = [c[0] for c in CASES]


def _peft_json(config: LoraConfig) -> dict[str, Any]:
    """What peft writes to adapter_config.json (sets become lists; order made stable)."""
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    return json.loads(json.dumps(data))


def _spec(adapter: dict[str, Any], top: dict[str, Any]):
    return load_spec({"version": 1, **top, "adapters": {"default": adapter}})


@pytest.mark.parametrize(("name", "adapter", "top", "kwargs"), CASES, ids=IDS)
def test_to_peft_config_equals_what_peft_writes(name, adapter, top, kwargs):
    ours = _spec(adapter, top).to_peft_config()
    theirs = _peft_json(LoraConfig(**kwargs))
    assert ours == theirs
    assert list(ours) == list(theirs)  # same keys, in PEFT's order


@pytest.mark.parametrize(("name", "adapter", "top", "kwargs"), CASES, ids=IDS)
def test_from_peft_config_gives_the_spec(name, adapter, top, kwargs):
    expected = _spec(adapter, top)
    assert from_peft_config(LoraConfig(**kwargs).to_dict()) == expected
    assert load_spec(LoraConfig(**kwargs)) == expected


@pytest.mark.parametrize(("name", "adapter", "top", "kwargs"), CASES, ids=IDS)
def test_peft_reads_what_adaptc_writes(name, adapter, top, kwargs, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(_spec(adapter, top).to_peft_config()))
    loaded = LoraConfig.from_pretrained(str(tmp_path))
    assert _peft_json(loaded) == _peft_json(LoraConfig(**kwargs))


@pytest.mark.parametrize(("name", "adapter", "top", "kwargs"), CASES, ids=IDS)
def test_adaptc_reads_what_peft_saves(name, adapter, top, kwargs, tmp_path):
    LoraConfig(**kwargs).save_pretrained(str(tmp_path))
    assert load_spec(tmp_path) == _spec(adapter, top)
    assert load_spec(tmp_path / "adapter_config.json") == _spec(adapter, top)


def test_all_linear_with_layers_has_no_peft_form():
    spec = _spec({"targets": {"kind": "all-linear"}, "layers": {"indices": [0]}}, {})
    with pytest.raises(ValueError, match="'all-linear' with layers has no PEFT equivalent"):
        spec.to_peft_config()


def test_target_names_are_written_sorted():
    spec = _spec({"targets": {"kind": "names", "names": ["v_proj", "k_proj", "q_proj"]}}, {})
    assert spec.to_peft_config()["target_modules"] == ["k_proj", "q_proj", "v_proj"]


def test_int_layers_to_transform_and_string_pattern():
    spec = from_peft_config(
        {
            "peft_type": "LORA",
            "target_modules": ["q"],
            "layers_to_transform": 3,
            "layers_pattern": "h",
        }
    )
    layers = spec.adapter().layers
    assert layers is not None and (layers.indices, layers.pattern) == ((3,), ("h",))


def test_inference_mode_is_a_run_time_setting():
    spec = _spec({}, {})
    assert spec.to_peft_config(inference_mode=True)["inference_mode"] is True
    assert from_peft_config({"peft_type": "LORA", "inference_mode": True}) == spec


def test_target_modules_override_for_resolved_selectors():
    spec = _spec({"targets": {"kind": "types", "types": ["nn.Linear"]}}, {})
    with pytest.raises(ValueError, match="targets of kind 'types' have no PEFT equivalent"):
        spec.to_peft_config()
    assert spec.to_peft_config(target_modules=["fc2", "fc1"])["target_modules"] == ["fc1", "fc2"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"peft_type": "POLY"},
            "peft_type: peft_type 'POLY' is not supported by adaptc (supported: ",
        ),
        ({"peft_type": "LORA", "use_qalora": True}, "use_qalora: 'use_qalora' is not supported"),
        (
            {"peft_type": "LORA", "init_lora_weights": "corda"},
            "init_lora_weights: init_lora_weights='corda' is not supported by adaptc",
        ),
        (
            {"peft_type": "LORA", "layer_replication": [[4, 0]]},
            "layer_replication: [4, 0) is empty: a range is [start, end) with start < end",
        ),
        (
            {"peft_type": "LORA", "target_parameters": ["experts.w"], "lora_dropout": 0.1},
            "target_parameters: target_parameters cannot be combined with lora_dropout",
        ),
        ({"peft_type": "LORA", "r": 0}, "r: must be > 0, got 0"),
        (
            {"peft_type": "LORA", "target_modules": "(a+)+"},
            "target_modules: regex '(a+)+' may backtrack catastrophically",
        ),
        (
            {"peft_type": "LORA", "target_modules": []},
            "target_modules: targets kind 'none' selects nothing: it needs target_parameters",
        ),
        (
            {"peft_type": "LORA", "layers_pattern": "layers"},
            "layers_pattern: layers_pattern needs layers_to_transform",
        ),
        (
            {"peft_type": "LORA", "task_type": "CAUSAL"},
            "task_type: expected 'SEQ_CLS', 'SEQ_2_SEQ_LM', 'CAUSAL_LM'",
        ),
        (
            {"peft_type": "LORA", "use_dora": True, "lora_bias": True},
            "lora_bias: lora_bias cannot be combined with use_dora",
        ),
    ],
)
def test_unsupported_or_invalid_peft_configs_name_the_key(config, message):
    with pytest.raises(SpecError) as info:
        from_peft_config(config)
    assert message in str(info.value)


def test_peft_config_file_errors_point_at_the_key(write):
    path = write(
        "adapter_config.json",
        '{\n  "peft_type": "LORA",\n  "r": -1,\n  "use_qalora": true\n}\n',
    )
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [str(i) for i in info.value.issues] == [
        f"{path}:3:8: r: must be > 0, got -1",
        f"{path}:4:3: use_qalora: 'use_qalora' is not supported by adaptc",
    ]


def test_unknown_keys_at_their_defaults_are_ignored():
    # a newer peft may add fields; at their default they change nothing
    spec = from_peft_config({"peft_type": "LORA", "some_future_option": None, "other": False})
    assert spec == _spec({}, {})
