"""IA3 on its own, against the real ``peft`` 0.21.2: spec, PEFT config, branch, emit, merge.

These tests use the IA3 method's modules directly (``adaptc.methods.ia3``), so they do not
depend on the method being registered; ``test_ia3_api.py`` goes through the public API.
Both sides hold the same vectors (PEFT's, drawn at random so that every factor counts)
and must agree to float32 rounding (bit for bit in bfloat16).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Any

import peft
import pytest
import torch
from peft.tuners.ia3 import IA3Model
from peft.utils import constants as peft_constants
from pydantic import ValidationError
from torch import fx, nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from adaptc.layers import kind_of
from adaptc.methods.base import UnsupportedByMethodError
from adaptc.methods.ia3.defaults import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES
from adaptc.methods.ia3.method import METHOD, IA3Branch, IA3Settings
from adaptc.methods.ia3.spec import SPEC, IA3Adapter, NoModules, is_feedforward
from adaptc.spec.fields import NameTargets, RegexTargets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}


def adapter(**fields: Any) -> IA3Adapter:
    return IA3Adapter.model_validate({"method": "ia3", **fields})


def names(*entries: str) -> dict[str, Any]:
    return {"kind": "names", "names": list(entries)}


# --- the spec model ----------------------------------------------------------------------


def test_minimal_adapter_and_defaults() -> None:
    a = adapter(targets=names("k_proj", "down_proj"), feedforward=names("down_proj"))
    assert a.method == "ia3"
    assert a.feedforward == NameTargets(kind="names", names=("down_proj",))
    assert (a.init, a.fan_in_fan_out, a.modules_to_save, a.layers, a.exclude) == (
        "ones",
        False,
        (),
        None,
        None,
    )
    assert adapter().targets is None and adapter().feedforward is None  # PEFT's defaults


def test_method_is_required_and_the_model_is_frozen_and_closed() -> None:
    with pytest.raises(ValidationError, match="method"):
        IA3Adapter.model_validate({"targets": names("q")})
    with pytest.raises(ValidationError, match="Input should be 'ia3'"):
        IA3Adapter.model_validate({"method": "lora"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        adapter(r=8)  # a LoRA field
    a = adapter()
    with pytest.raises(ValidationError, match="frozen"):
        a.init = "random"


@pytest.mark.parametrize(
    ("feedforward", "expected"),
    [
        (names("fc2"), NameTargets(kind="names", names=("fc2",))),
        ({"kind": "regex", "pattern": r".*\.fc2"}, RegexTargets(kind="regex", pattern=r".*\.fc2")),
        ({"kind": "none"}, NoModules(kind="none")),
    ],
)
def test_feedforward_selectors(feedforward: dict[str, Any], expected: Any) -> None:
    assert adapter(feedforward=feedforward).feedforward == expected


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "feedforward-not-a-target": (
        {"targets": names("k_proj", "v_proj"), "feedforward": names("down_proj")},
        "'down_proj' is in feedforward.names but not in targets.names: feed-forward modules "
        "must be targets",
    ),
    "feedforward-all-linear": (
        {"feedforward": {"kind": "all-linear"}},
        "does not match any of the expected tags: 'names', 'regex', 'none'",
    ),
    "feedforward-empty-names": ({"feedforward": names()}, "at least 1 item"),
    "feedforward-bad-regex": (
        {"feedforward": {"kind": "regex", "pattern": "(a+)+"}},
        "nested quantifier",
    ),
    "init": ({"init": "zeros"}, "Input should be 'ones' or 'random'"),
    "init-bool": ({"init": True}, "Input should be 'ones' or 'random'"),
    "fan_in_fan_out-string": ({"fan_in_fan_out": "yes"}, "valid boolean"),
    "layers-with-regex": (
        {"targets": {"kind": "regex", "pattern": ".*q"}, "layers": {"indices": [0]}},
        "layers cannot be combined with a regex target",
    ),
    "exclude-overlap": (
        {"targets": names("q", "v"), "exclude": names("v")},
        "'v' is both in targets.names and exclude.names",
    ),
    "save-overlap": (
        {"targets": names("q", "lm_head"), "modules_to_save": ["lm_head"]},
        "'lm_head' is both in targets.names and modules_to_save",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_are_refused_with_a_message(case: str) -> None:
    fields, message = BAD[case]
    with pytest.raises(ValidationError) as info:
        adapter(**fields)
    assert message in str(info.value)


def test_feedforward_subset_rule_is_peft_s() -> None:
    # PEFT checks it only when both are lists: a regex or all-linear target skips it
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    peft.IA3Config(target_modules=".*proj", feedforward_modules=["down_proj"])
    peft.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"])
    adapter(targets={"kind": "regex", "pattern": ".*proj"}, feedforward=names("down_proj"))
    adapter(targets={"kind": "all-linear"}, feedforward=names("down_proj"))
    adapter(targets={"kind": "types", "types": ["nn.Linear"]}, feedforward=names("down_proj"))
    adapter(feedforward=names("down_proj"))  # targets: the model type's default


def test_every_field_is_described() -> None:
    for name, info in IA3Adapter.model_fields.items():
        assert info.description, name
    assert NoModules.model_fields["kind"].description


# --- PEFT's IA3Config both ways ------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(value)
    return value


def peft_dict(**kwargs: Any) -> dict[str, Any]:
    """``peft.IA3Config(**kwargs).to_dict()`` as ``adapter_config.json`` holds it."""
    return {k: _plain(v) for k, v in peft.IA3Config(**kwargs).to_dict().items()}


def refusals(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    SPEC.from_peft(cfg, lambda key, message: found.append((key, message)))
    return found


def round_trip(cfg: dict[str, Any]) -> dict[str, Any]:
    """PEFT config -> spec adapter -> PEFT config, the envelope copied as the caller does."""
    fields = SPEC.from_peft(cfg, lambda key, message: pytest.fail(f"{key}: {message}"))
    a = IA3Adapter.model_validate(fields)
    out = SPEC.to_peft(a, None)
    for key in ("task_type", "base_model_name_or_path", "revision", "inference_mode"):
        out[key] = cfg[key]
    return out


ROUND_TRIPS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "llama": {
        "task_type": "CAUSAL_LM",
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    },
    "regex": {
        "target_modules": r".*\.(SelfAttention|EncDecAttention)\.(k|v)$|.*\.wo$",
        "feedforward_modules": r".*\.wo",
    },
    "regex-targets-names-feedforward": {
        "target_modules": r".*\.(k|v|wo)",
        "feedforward_modules": ["wo"],
    },
    "no-feedforward": {"target_modules": ["q", "v"], "feedforward_modules": []},
    "gpt2-everything": {
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": "gpt2",
        "revision": "main",
        "inference_mode": True,
        "target_modules": ["c_attn", "mlp.c_proj"],
        "exclude_modules": ["h.0.attn.c_attn"],
        "feedforward_modules": ["mlp.c_proj"],
        "fan_in_fan_out": True,
        "modules_to_save": ["score", "ln_f"],
        "init_ia3_weights": False,
    },
    "exclude-regex": {
        "target_modules": ["fc1", "fc2"],
        "exclude_modules": r".*\.0\..*",
        "feedforward_modules": ["fc2"],
    },
    "all-linear": {"target_modules": "all-linear", "feedforward_modules": ["down_proj"]},
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_peft_config_round_trip(case: str) -> None:
    cfg = peft_dict(**ROUND_TRIPS[case])
    out = round_trip(cfg)
    assert out == cfg
    assert list(out) == list(cfg)  # IA3Config.to_dict()'s key order


def test_to_peft_writes_every_key_in_peft_s_order_with_its_defaults() -> None:
    out = SPEC.to_peft(adapter(targets=names("q")), None)
    assert list(out) == list(peft_dict())
    assert out == {**peft_dict(), "target_modules": ["q"]}


def test_spec_form_of_peft_fields() -> None:
    fields = SPEC.from_peft(
        peft_dict(
            target_modules=["v", "k", "wo"],
            feedforward_modules=["wo"],
            init_ia3_weights=False,
            modules_to_save=["lm_head"],
        ),
        lambda key, message: pytest.fail(message),
    )
    a = IA3Adapter.model_validate(fields)
    assert a.targets == NameTargets(kind="names", names=("k", "v", "wo"))
    assert a.feedforward == NameTargets(kind="names", names=("wo",))
    assert (a.init, a.modules_to_save) == ("random", ("lm_head",))
    empty = IA3Adapter.model_validate(
        SPEC.from_peft(peft_dict(feedforward_modules=[]), lambda k, m: pytest.fail(m))
    )
    assert empty.feedforward == NoModules(kind="none")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("layers_to_transform", [0, 1], "'layers_to_transform' is not an IA3 option"),
        ("layers_pattern", "layers", "'layers_pattern' is not an IA3 option"),
        ("init_ia3_weights", "gaussian", "init_ia3_weights='gaussian' is not supported"),
        ("r", 8, "'r' is not supported by adaptc for IA3"),
        ("use_dora", True, "'use_dora' is not supported by adaptc for IA3"),
    ],
)
def test_unsupported_peft_options_are_refused_by_name(key: str, value: Any, message: str) -> None:
    cfg = {**peft_dict(target_modules=["q"]), key: value}
    found = refusals(cfg)
    assert [k for k, _ in found] == [key]
    assert message in found[0][1]


def test_peft_has_no_layer_selection_for_ia3() -> None:
    with pytest.raises(TypeError, match="layers_to_transform"):
        peft.IA3Config(target_modules=["q"], layers_to_transform=[0])  # type: ignore[call-arg]
    assert not refusals({**peft_dict(), "layers_to_transform": None, "layers_pattern": None})


def test_spec_layers_are_written_as_resolved_paths() -> None:
    a = adapter(
        targets=names("k_proj", "down_proj"),
        feedforward=names("down_proj"),
        layers={"indices": [1]},
    )
    with pytest.raises(ValueError, match="IA3Config has no layers_to_transform"):
        SPEC.to_peft(a, None)
    paths = ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    out = SPEC.to_peft(a, paths)
    assert "layers_to_transform" not in out and "layers_pattern" not in out
    assert out["target_modules"] == sorted(paths)
    assert out["feedforward_modules"] == ["model.layers.1.mlp.down_proj"]
    peft.IA3Config(**{k: v for k, v in out.items() if k != "peft_type"})  # PEFT accepts it


def test_resolved_targets_keep_a_feedforward_list_that_is_a_subset() -> None:
    a = adapter(feedforward=names("down_proj"))
    out = SPEC.to_peft(a, ["k_proj", "v_proj", "down_proj"])  # the model type's default names
    assert (out["target_modules"], out["feedforward_modules"]) == (
        ["down_proj", "k_proj", "v_proj"],
        ["down_proj"],
    )
    regex = adapter(feedforward={"kind": "regex", "pattern": ".*mlp.*"})
    assert SPEC.to_peft(regex, ["a.mlp.fc"])["feedforward_modules"] == ".*mlp.*"


def test_a_default_feedforward_outside_the_targets_is_written_so_peft_reads_it() -> None:
    # peft writes IA3Config(target_modules=[k_proj, v_proj]) on llama with its default
    # feedforward_modules [down_proj], a file its own subset check then refuses to load
    a = METHOD.with_defaults(adapter(targets=names("k_proj", "v_proj")), "llama")
    out = SPEC.to_peft(a, None)
    assert out["feedforward_modules"] == ".*(?:down_proj)"
    peft.IA3Config(**{k: v for k, v in out.items() if k != "peft_type"})
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    regex = RegexTargets(kind="regex", pattern=out["feedforward_modules"])
    for key in FF_KEYS:
        assert is_feedforward(regex, key) == is_feedforward(a.feedforward, key)


def test_peft_keys_locate_errors() -> None:
    assert SPEC.peft_type == "IA3" and SPEC.model is IA3Adapter
    assert SPEC.peft_keys["feedforward"] == "feedforward_modules"
    assert SPEC.peft_keys["init"] == "init_ia3_weights"
    assert SPEC.peft_keys["targets"] == "target_modules"


# --- feed-forward matching and PEFT's defaults -----------------------------------------------


FF_KEYS = [
    "model.layers.0.mlp.down_proj",
    "model.layers.0.self_attn.k_proj",
    "down_proj",
    "encoder.block.0.layer.1.DenseReluDense.wo",
    "h.0.mlp.c_proj",
    "h.0.attn.c_proj",
]
FF_SELECTORS: list[list[str] | str] = [
    ["down_proj"],
    ["proj"],  # a plain suffix in PEFT: also matches down_proj and c_proj
    ["mlp.c_proj"],
    ["wo", "k_proj"],
    r".*\.mlp\..*",
    r"down_proj",
    r".*(wo|down_proj)",
]


@pytest.mark.parametrize("selector", FF_SELECTORS, ids=str)
def test_feedforward_matching_is_peft_s(selector: list[str] | str) -> None:
    config = peft.IA3Config(target_modules=".*", feedforward_modules=selector)
    if isinstance(selector, str):
        ff: Any = RegexTargets(kind="regex", pattern=selector)
    else:
        ff = NameTargets(kind="names", names=tuple(selector))
    for key in FF_KEYS:
        assert is_feedforward(ff, key) == IA3Model._check_target_module_feedforward(config, key)
    assert not any(is_feedforward(NoModules(kind="none"), key) for key in FF_KEYS)


def test_default_tables_are_peft_s() -> None:
    peft_targets = peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    peft_ff = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    assert {k: tuple(v) for k, v in peft_targets.items()} == IA3_TARGET_MODULES
    assert {k: tuple(v) for k, v in peft_ff.items()} == IA3_FEEDFORWARD_MODULES
    assert METHOD.default_targets is IA3_TARGET_MODULES


def test_with_defaults_fills_feedforward_as_peft_does() -> None:
    a = adapter(targets=names("k_proj", "v_proj"))  # PEFT: down_proj, though not a target
    filled = METHOD.with_defaults(a, "llama")
    assert filled.feedforward == NameTargets(kind="names", names=("down_proj",))
    assert filled.targets == a.targets
    assert METHOD.with_defaults(adapter(), "mt5").feedforward == NoModules(kind="none")
    given = adapter(feedforward={"kind": "none"})
    assert METHOD.with_defaults(given, None) is given
    with pytest.raises(ValueError, match="no default feed-forward modules for model type 'x'"):
        METHOD.with_defaults(adapter(), "x")
    with pytest.raises(ValueError, match=r"no config\.model_type"):
        METHOD.with_defaults(adapter(), None)


# --- one-model harness: the compiler's rewrite, by hand -------------------------------------


class _Leaves(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(m, qualified_name)


def ia3_spec(targets: dict[str, bool], init: str = "random") -> IA3Adapter:
    ff = [path for path, is_ff in targets.items() if is_ff]
    return adapter(
        targets=names(*targets),
        feedforward=names(*ff) if ff else {"kind": "none"},
        init=init,
    )


def compile_ia3(
    model: nn.Module, targets: dict[str, bool], *, init: str = "random"
) -> fx.GraphModule:
    """What the compiler does for each target of ``model`` (which is left alone)."""
    model = copy.deepcopy(model)
    gm = fx.GraphModule(model, _Leaves(set(targets)).trace(model))
    spec = ia3_spec(targets, init)
    for path in targets:
        layer = gm.get_submodule(path)
        kind = kind_of(layer, path)
        settings = METHOD.settings(kind, layer, path, "default", spec)
        assert settings.feedforward == targets[path]
        assert METHOD.check(kind, layer, settings) == []
        branch, replaced = METHOD.make_branch(kind, layer, settings)
        assert replaced == {}
        layer.add_module(METHOD.child_name("default"), branch)
        call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
        before = set(gm.graph.nodes)
        out = METHOD.emit(
            gm.graph,
            call,
            call.args[0] if call.args else next(iter(call.kwargs.values())),
            call,
            kind=kind,
            base=layer,
            branch=branch,
            branch_path=f"{path}.ia3_default",
        )
        new = set(gm.graph.nodes) - before
        if out is not call:
            call.replace_all_uses_with(out, delete_user_cb=lambda user, new=new: user not in new)
    gm.graph.lint()
    gm.recompile()
    return gm


def peft_ia3(model: nn.Module, targets: dict[str, bool], **kwargs: Any) -> nn.Module:
    config = peft.IA3Config(
        target_modules=list(targets),
        feedforward_modules=[p for p, ff in targets.items() if ff],
        **kwargs,
    )
    return peft.get_peft_model(copy.deepcopy(model), config)


def branch_at(gm: nn.Module, path: str) -> IA3Branch:
    branch = gm.get_submodule(f"{path}.ia3_default")
    assert isinstance(branch, IA3Branch)
    return branch


def peft_vector(peft_model: Any, path: str) -> Any:
    return peft_model.base_model.model.get_submodule(path).ia3_l["default"]


def adapt_both(model: nn.Module, targets: dict[str, bool]) -> tuple[fx.GraphModule, nn.Module]:
    """adaptc's and PEFT's model, holding PEFT's random vectors (init_ia3_weights=False)."""
    ours = compile_ia3(model, targets)
    theirs = peft_ia3(model, targets, init_ia3_weights=False)
    with torch.no_grad():
        for path in targets:
            mine, ref = branch_at(ours, path).ia3_l, peft_vector(theirs, path)
            assert (mine.shape, mine.dtype, mine.device) == (ref.shape, ref.dtype, ref.device)
            assert mine.requires_grad and ref.requires_grad
            mine.copy_(ref)
    return ours.eval(), theirs.eval()


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16, bias=bias)
        self.fc2 = nn.Linear(16, 4, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


class CNN(nn.Module):
    def __init__(self, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, groups=groups, bias=bias)
        self.conv2 = nn.Conv2d(8, 6, 1, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))  # type: ignore[no-any-return]


class CNN3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 3, (1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))  # type: ignore[no-any-return]


def gpt2_mlp() -> nn.Module:
    """GPT-2's MLP block: transformers ``Conv1D`` layers ``c_fc`` (16→32), ``c_proj`` (32→16)."""
    return GPT2MLP(32, GPT2Config(n_embd=16, resid_pdrop=0.0))


CASES: dict[str, tuple[Any, dict[str, bool], tuple[int, ...]]] = {
    "mlp": (MLP, {"fc1": False, "fc2": True}, (3, 8)),
    "mlp-swapped": (MLP, {"fc1": True, "fc2": False}, (2, 3, 8)),
    "mlp-nobias": (lambda: MLP(bias=False), {"fc1": False, "fc2": True}, (3, 8)),
    "mlp-output-only": (MLP, {"fc1": False, "fc2": False}, (3, 8)),
    "mlp-input-only": (MLP, {"fc1": True, "fc2": True}, (3, 8)),
    "cnn": (CNN, {"conv1": False, "conv2": True}, (2, 4, 5, 5)),
    "cnn-swapped": (CNN, {"conv1": True, "conv2": False}, (2, 4, 5, 5)),
    "cnn-groups": (lambda: CNN(groups=2), {"conv1": True, "conv2": False}, (2, 4, 5, 5)),
    "cnn-groups-swapped": (lambda: CNN(groups=2), {"conv1": False, "conv2": True}, (1, 4, 6, 5)),
    "cnn-nobias": (lambda: CNN(bias=False), {"conv1": False, "conv2": True}, (2, 4, 5, 5)),
    "conv3d": (CNN3d, {"conv1": False, "conv2": True}, (1, 2, 3, 4, 4)),
    "conv3d-swapped": (CNN3d, {"conv1": True, "conv2": False}, (1, 2, 3, 4, 4)),
    "gpt2-conv1d": (gpt2_mlp, {"c_fc": False, "c_proj": True}, (2, 5, 16)),
    "gpt2-conv1d-swapped": (gpt2_mlp, {"c_fc": True, "c_proj": False}, (2, 5, 16)),
}


def build(case: str) -> tuple[nn.Module, dict[str, bool], torch.Tensor]:
    factory, targets, shape = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # biases that matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return model, targets, torch.randn(*shape)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_peft(case: str) -> None:
    model, targets, x = build(case)
    ours, theirs = adapt_both(model, targets)
    with torch.no_grad():
        expected = theirs(x)
        assert not torch.allclose(expected, model(x), atol=1e-3)  # the vectors do something
    out = ours(x)
    torch.testing.assert_close(out, expected, **EXACT)

    g = torch.randn_like(expected)
    (out * g).sum().backward()
    (theirs(x) * g).sum().backward()
    for path in targets:
        mine, ref = branch_at(ours, path).ia3_l, peft_vector(theirs, path)
        assert mine.grad is not None and ref.grad is not None
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(case: str) -> None:
    model, targets, x = build(case)
    ours, theirs = adapt_both(model, targets)
    merged_peft = theirs.merge_and_unload()
    merged_ours = copy.deepcopy(model)
    for path in targets:
        layer = ours.get_submodule(path)
        kind = kind_of(layer)
        weight, bias = layer.weight, layer.bias
        saved = (weight.clone(), None if bias is None else bias.clone())
        new_weight, new_bias = METHOD.merge(kind, layer, branch_at(ours, path), weight, bias)
        assert torch.equal(weight, saved[0])  # inputs are never changed in place
        assert bias is None or torch.equal(bias, saved[1])  # type: ignore[arg-type]
        assert new_weight is not weight and new_weight.dtype == weight.dtype
        ref = merged_peft.get_submodule(path)
        torch.testing.assert_close(new_weight, ref.weight, **EXACT)
        if bias is None:
            assert new_bias is None
        else:
            assert new_bias is not None
            torch.testing.assert_close(new_bias, ref.bias, **EXACT)
            if targets[path]:  # a feed-forward merge leaves the bias alone
                assert new_bias is bias
        merged_ours.set_submodule(path, kind.with_weights(layer, new_weight, new_bias))
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(x), merged_peft(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged_ours(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["mlp", "mlp-swapped", "cnn", "cnn-swapped", "gpt2-conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_a_float32_vector_and_peft_s_casts(
    case: str, dtype: torch.dtype
) -> None:
    model, targets, x = build(case)
    model = model.to(dtype)
    x = x.to(dtype)
    ours, theirs = adapt_both(model, targets)
    for path in targets:
        assert branch_at(ours, path).ia3_l.dtype == torch.float32
    with torch.no_grad():
        out, expected = ours(x), theirs(x)
    assert out.dtype == expected.dtype == dtype
    assert torch.equal(out, expected)  # the same operations: bit for bit
    merged = theirs.merge_and_unload()
    for path in targets:
        layer = ours.get_submodule(path)
        w, b = METHOD.merge(kind_of(layer), layer, branch_at(ours, path), layer.weight, layer.bias)
        assert w.dtype == dtype and torch.equal(w, merged.get_submodule(path).weight)
        if b is not None:
            assert torch.equal(b, merged.get_submodule(path).bias)


@pytest.mark.parametrize("init", ["ones", "random"])
def test_initial_vectors_and_random_stream_match_peft_under_one_seed(init: str) -> None:
    model, targets, _ = build("gpt2-conv1d")
    torch.manual_seed(7)
    ours = compile_ia3(model, targets, init=init)
    after_ours = torch.randn(4)
    torch.manual_seed(7)
    theirs = peft_ia3(model, targets, init_ia3_weights=init == "ones")
    after_theirs = torch.randn(4)
    for path in targets:
        assert torch.equal(branch_at(ours, path).ia3_l, peft_vector(theirs, path))
    if init == "ones":
        assert all(bool((branch_at(ours, p).ia3_l == 1).all()) for p in targets)
    assert torch.equal(after_ours, after_theirs)  # PEFT draws even for ones


def test_file_tensors_are_peft_s_keys_and_shapes() -> None:
    model, targets, _ = build("cnn")
    ours, theirs = adapt_both(model, targets)
    state = peft.get_peft_model_state_dict(theirs)
    mine = {
        f"base_model.model.{path}.{name}": tensor
        for path in targets
        for name, tensor in branch_at(ours, path).file_tensors()
    }
    assert mine.keys() == state.keys()
    for key, tensor in mine.items():
        assert torch.equal(tensor, state[key])


def test_shapes_per_layer_kind() -> None:
    cases = [
        (nn.Linear(8, 6), False, (6, 1)),
        (nn.Linear(8, 6), True, (1, 8)),
        (nn.Conv2d(4, 6, 3), False, (1, 6, 1, 1)),
        (nn.Conv2d(4, 6, 3), True, (1, 4, 1, 1)),
        (nn.Conv3d(4, 6, 3), False, (1, 6, 1, 1, 1)),
        (gpt2_mlp().c_fc, False, (32, 1)),
        (gpt2_mlp().c_fc, True, (1, 16)),
    ]
    for layer, ff, shape in cases:
        kind = kind_of(layer)
        settings = IA3Settings("default", "layer", feedforward=ff, fan_in_fan_out=False)
        branch, _ = METHOD.make_branch(kind, layer, settings)
        assert tuple(branch.ia3_l.shape) == shape, (layer, ff)
        meta = copy.deepcopy(layer).to("meta")
        on_meta, _ = METHOD.make_branch(kind, meta, settings)
        assert on_meta.ia3_l.is_meta and tuple(on_meta.ia3_l.shape) == shape


def test_settings_plan_row_and_fields() -> None:
    mlp = gpt2_mlp()
    spec = ia3_spec({"c_fc": False, "c_proj": True})
    s = METHOD.settings(kind_of(mlp.c_proj), mlp.c_proj, "h.0.mlp.c_proj", "default", spec)
    assert s == IA3Settings("default", "h.0.mlp.c_proj", True, True, "random")
    assert METHOD.columns() == ("feedforward",)
    assert METHOD.row(s) == ("yes",)
    assert METHOD.plan_fields(s) == {"feedforward": True, "fan_in_fan_out": True, "init": "random"}
    linear = nn.Linear(2, 2)
    on_linear = METHOD.settings(
        kind_of(linear),
        linear,
        "fc",
        "default",
        adapter(fan_in_fan_out=True, feedforward=names("x")),
    )
    assert (on_linear.fan_in_fan_out, METHOD.row(on_linear)) == (False, ("no",))  # as PEFT
    assert dataclasses.replace(s, adapter="", target="") == dataclasses.replace(
        s, adapter="", target=""
    )
    with pytest.raises(ValueError, match="feedforward is omitted"):
        METHOD.settings(kind_of(linear), linear, "fc", "default", adapter())


@pytest.mark.parametrize("layer", [nn.Embedding(10, 4), nn.Conv1d(2, 3, 3)], ids=type)
def test_layers_peft_refuses_are_refused(layer: nn.Module) -> None:
    kind = kind_of(layer)
    assert not METHOD.supports(kind)
    settings = IA3Settings("default", "layer", feedforward=False, fan_in_fan_out=False)
    with pytest.raises(UnsupportedByMethodError, match="ia3 does not support"):
        METHOD.make_branch(kind, layer, settings)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

    with pytest.raises(ValueError, match="not supported"):
        peft_ia3(Wrap(), {"layer": False})


def test_feedforward_rewrites_a_keyword_input() -> None:
    class ByKeyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model = ByKeyword().eval()
    ours = compile_ia3(model, {"fc": True})  # (PEFT's IA3 layer takes no `input=` keyword)
    x = torch.randn(2, 4)
    vector = branch_at(ours, "fc").ia3_l
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model.fc(x * vector.flatten()), **EXACT)
    call = next(n for n in ours.graph.nodes if n.op == "call_module" and n.target == "fc")
    assert not call.args and call.kwargs["input"].target.__name__ == "mul"


def test_emitted_code_reads_the_vector_by_its_path() -> None:
    model, targets, _ = build("mlp")
    code = compile_ia3(model, targets).code
    assert "self.fc1.ia3_default.ia3_l" in code and "self.fc2.ia3_default.ia3_l" in code
    assert "fc2 = self.fc2(mul_1)" in code  # the feed-forward layer reads its scaled input
