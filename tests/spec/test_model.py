"""The spec models: defaults, immutability, and the rules across fields."""

from __future__ import annotations

import pydantic
import pytest

from adaptc.spec import LoraAdapter, NameTargets, Spec, SpecError, load_spec


def spec(**adapter) -> Spec:
    return load_spec({"version": 1, "adapters": {"default": adapter}})


def error(**adapter) -> str:
    with pytest.raises(SpecError) as info:
        spec(**adapter)
    return str(info.value)


def test_defaults_are_peft_defaults():
    a = spec().adapter()
    assert (a.r, a.lora_alpha, a.lora_dropout) == (8, 8, 0.0)
    assert (a.bias, a.init, a.use_rslora, a.use_dora, a.lora_bias) == (
        "none",
        "default",
        False,
        False,
        False,
    )
    assert a.targets is None and a.exclude is None and a.layers is None
    assert a.modules_to_save == () and a.rank_pattern == {} and a.alpha_pattern == {}


def test_spec_is_frozen():
    s = spec(r=4)
    with pytest.raises(pydantic.ValidationError):
        s.merge = True  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        s.adapter().r = 16  # type: ignore[misc]


def test_lists_become_tuples():
    a = spec(targets={"kind": "names", "names": ["q_proj", "v_proj"]}).adapter()
    assert a.targets == NameTargets(kind="names", names=("q_proj", "v_proj"))


def test_integral_alpha_stays_an_int():
    assert spec(lora_alpha=32).adapter().lora_alpha == 32
    assert isinstance(spec(lora_alpha=32).adapter().lora_alpha, int)
    assert spec(lora_alpha=0.5).adapter().lora_alpha == 0.5
    assert spec(lora_alpha=32).to_dict()["adapters"]["default"]["lora_alpha"] == 32


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"r": 0}, "adapters.default.r: must be > 0, got 0"),
        ({"r": -3}, "adapters.default.r: must be > 0, got -3"),
        ({"lora_alpha": 0}, "adapters.default.lora_alpha: must be > 0.0, got 0"),
        ({"lora_dropout": 1}, "adapters.default.lora_dropout: must be < 1.0, got 1"),
        ({"lora_dropout": -0.5}, "adapters.default.lora_dropout: must be ≥ 0.0, got -0.5"),
        (
            {"use_dora": True, "lora_bias": True},
            "adapters.default.lora_bias: lora_bias cannot be combined with use_dora",
        ),
        (
            {"init": "olora", "lora_bias": True},
            "adapters.default.lora_bias: lora_bias needs init 'default' or 'random', not 'olora'",
        ),
        (
            {"pissa_niter": 2},
            "adapters.default.pissa_niter: pissa_niter needs init 'pissa', not 'default'",
        ),
        (
            {"targets": {"kind": "regex", "pattern": ".*q"}, "layers": {"indices": [0]}},
            "adapters.default.layers: layers cannot be combined with a regex target: "
            "put the layer index in the pattern",
        ),
        (
            {
                "targets": {"kind": "names", "names": ["q", "v"]},
                "exclude": {"kind": "names", "names": ["v"]},
            },
            "adapters.default.exclude.names: 'v' is both in targets.names and exclude.names",
        ),
        (
            {"targets": {"kind": "names", "names": ["head"]}, "modules_to_save": ["head"]},
            "adapters.default.modules_to_save: 'head' is both in targets.names and modules_to_save",
        ),
        (
            {"targets": {"kind": "names", "names": []}},
            "adapters.default.targets.names: must have at least 1 item",
        ),
        (
            {"targets": {"kind": "regex", "pattern": ""}},
            "adapters.default.targets.pattern: must not be empty",
        ),
        (
            {"targets": {"kind": "types", "types": []}},
            "adapters.default.targets.types: must have at least 1 item",
        ),
        (
            {"modules_to_save": ["a", "a"]},
            "adapters.default.modules_to_save: duplicate entry 'a'",
        ),
        (
            {"layers": {"indices": [1], "pattern": ["(h+)+"]}},
            "adapters.default.layers.pattern.0: regex '(h+)+' may backtrack catastrophically: "
            "it repeats a group that itself repeats without bound; rewrite it without nested "
            "quantifiers",
        ),
        (
            {"alpha_pattern": {"q": -1}},
            "adapters.default.alpha_pattern.q: must be > 0.0, got -1",
        ),
    ],
)
def test_rule(adapter, message):
    assert error(**adapter) == message


def test_rules_that_hold_allow_the_combination():
    spec(use_dora=True, init="gaussian")
    spec(lora_bias=True, init="random")
    spec(init="pissa", pissa_niter=0)
    spec(targets={"kind": "all-linear"}, layers={"indices": [0, 1]})
    spec(
        targets={"kind": "names", "names": ["q"]},
        exclude={"kind": "regex", "pattern": ".*\\.q"},
        modules_to_save=["classifier"],
    )


def test_duplicate_adapter_names_are_impossible_in_a_mapping_and_reported_in_files(write):
    path = write("dup.yaml", "version: 1\nadapters:\n  a: {}\n  a: {r: 4}\n")
    with pytest.raises(SpecError, match=r"dup.yaml:4:3: adapters.a: duplicate key 'a'"):
        load_spec(path)


def test_reserved_and_invalid_adapter_names():
    with pytest.raises(SpecError, match="adapter name '__base__' is reserved"):
        load_spec({"version": 1, "adapters": {"__base__": {}}})
    with pytest.raises(SpecError, match=r"invalid adapter name 'a\.b'"):
        load_spec({"version": 1, "adapters": {"a.b": {}}})


def test_version_must_be_the_integer_one():
    for bad, message in [
        (2, "version: unsupported spec version 2; this adaptc reads version 1"),
        (True, "version: expected the integer 1, got bool True"),
        (1.0, "version: expected the integer 1, got float 1.0"),
        ("1", "version: expected the integer 1, got str '1'"),
    ]:
        with pytest.raises(SpecError) as info:
            load_spec({"version": bad, "adapters": {"a": {}}})
        assert str(info.value) == message


def test_strict_types_refuse_coercion():
    assert error(r="8") == "adapters.default.r: expected an integer, got string '8'"
    assert error(r=8.0) == "adapters.default.r: expected an integer, got number 8.0"
    assert error(use_dora=1) == "adapters.default.use_dora: expected true or false, got integer 1"
    assert error(use_dora="yes") == (
        "adapters.default.use_dora: expected true or false, got string 'yes'"
    )


def test_adapter_lookup():
    s = load_spec({"version": 1, "adapters": {"a": {"r": 4}, "b": {"r": 2}}})
    assert s.adapter("b").r == 2
    with pytest.raises(KeyError, match="spec has 2 adapters"):
        s.adapter()
    with pytest.raises(KeyError, match="no adapter 'c'"):
        s.adapter("c")


def test_to_dict_round_trips_and_omits_defaults():
    data = {
        "version": 1,
        "task_type": "CAUSAL_LM",
        "adapters": {
            "default": {
                "r": 16,
                "targets": {"kind": "names", "names": ["q_proj"]},
                "rank_pattern": {"q_proj": 4},
            }
        },
    }
    s = load_spec(data)
    assert s.to_dict() == data
    assert load_spec(s.to_dict()) == s


def test_load_spec_accepts_a_spec_and_rejects_other_types():
    s = spec()
    assert load_spec(s) is s
    with pytest.raises(TypeError, match="load_spec takes a path"):
        load_spec(42)


def test_adapter_model_can_be_built_directly():
    a = LoraAdapter(r=4, targets={"kind": "all-linear"})  # type: ignore[arg-type]
    assert a.r == 4 and a.targets is not None and a.targets.kind == "all-linear"
