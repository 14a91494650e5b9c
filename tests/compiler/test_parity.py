"""Same adapter weights in, same outputs and gradients out: adaptc against real peft.

Each case compiles a spec with adaptc and builds the equivalent ``LoraConfig`` with peft
on a copy of the same model, gives both the same (random, non-zero) adapter weights, and
compares the forward output and the gradients of every adapter weight (fp32).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adaptc
from adaptc.methods.lora.branch import LoraBranch
from tests.compiler.models import DummyModel, NestedMLP, hf_inputs, tiny_hf
from tests.compiler.parity import (
    adapter_grads,
    build_pair,
    output_tensor,
    peft_config,
    peft_grads,
    share_adapter_weights,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
FAMILY_TARGETS = {
    "opt": ["q_proj", "v_proj", "fc1"],
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "mt5": ["q", "v", "wi_0", "wo"],
    "bert": ["query", "value", "dense"],
}
# (option name, extra adapter fields); targets come from FAMILY_TARGETS
OPTIONS = [
    ("plain", {"r": 4, "lora_alpha": 8}),
    ("rslora", {"r": 4, "lora_alpha": 8, "use_rslora": True}),
    ("lora_bias", {"r": 2, "lora_alpha": 3, "lora_bias": True}),
    ("dropout-eval", {"r": 4, "lora_dropout": 0.3}),
    ("rank-alpha-pattern", {"r": 2, "rank_pattern": {"v.*": 6}, "alpha_pattern": {"q.*": 5}}),
    ("dora", {"r": 4, "lora_alpha": 8, "use_dora": True}),
]
FAMILIES = list(FAMILY_TARGETS)


def _spec(targets, fields, **top):
    return {"version": 1, **top, "adapters": {"default": {"targets": targets, **fields}}}


def _compare(peft_model, compiled, inputs, *, train=False):
    peft_model.train(train)
    compiled.train(train)
    ours = output_tensor(compiled(**inputs))
    theirs = output_tensor(peft_model(**inputs))
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    grads = adapter_grads(compiled)
    assert grads
    for key, expected in peft_grads(peft_model, grads).items():
        torch.testing.assert_close(grads[key], expected, rtol=1e-5, atol=1e-6, msg=str(key))


@pytest.mark.parametrize("option,fields", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_family_matches_peft(family, option, fields):
    model = tiny_hf(family)
    targets = {"kind": "names", "names": FAMILY_TARGETS[family]}
    peft_model, compiled = build_pair(model, _spec(targets, fields))
    _compare(peft_model, compiled, hf_inputs(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_match_peft(family):
    model = tiny_hf(family)
    peft_model, compiled = build_pair(model, {"version": 1, "adapters": {"default": {"r": 4}}})
    _compare(peft_model, compiled, hf_inputs(family))


@pytest.mark.parametrize("family", ["opt", "llama", "bert"])
def test_all_linear_matches_peft(family):
    peft_model, compiled = build_pair(
        tiny_hf(family), _spec({"kind": "all-linear"}, {"r": 2, "lora_alpha": 4})
    )
    _compare(peft_model, compiled, hf_inputs(family))


def test_regex_exclude_and_layers_match_peft():
    data = {
        "version": 1,
        "adapters": {
            "default": {
                "r": 3,
                "targets": {"kind": "names", "names": ["q_proj", "k_proj", "v_proj", "fc2"]},
                "exclude": {"kind": "regex", "pattern": r".*\.k_proj"},
                "layers": {"indices": [1], "pattern": ["layers"]},
            }
        },
    }
    peft_model, compiled = build_pair(tiny_hf("opt"), data)
    _compare(peft_model, compiled, hf_inputs("opt"))


def test_modules_to_save_match_peft():
    data = _spec(
        {"kind": "names", "names": ["query", "value"]}, {"modules_to_save": ["classifier"]}
    )
    data["task_type"] = "SEQ_CLS"
    model = tiny_hf("bert")
    peft_model, compiled = build_pair(model, data)
    with torch.no_grad():  # give both trainable copies the same new values
        for ours, theirs in zip(
            compiled.classifier.modules_to_save["default"].parameters(),
            peft_model.base_model.model.classifier.modules_to_save["default"].parameters(),
            strict=True,
        ):
            ours.add_(1.0)
            theirs.add_(1.0)
    _compare(peft_model, compiled, hf_inputs("bert"))
    assert adaptc.trainable_parameters(compiled) == tuple(peft_model.get_nb_trainable_parameters())


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_parameter_counts_match_peft(bias):
    model = tiny_hf("opt")
    data = _spec(
        {"kind": "names", "names": ["q_proj", "v_proj"]}, {"bias": bias, "lora_bias": False}
    )
    spec = adaptc.load_spec(data)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    compiled = adaptc.compile(model, spec)
    assert adaptc.trainable_parameters(compiled) == tuple(peft_model.get_nb_trainable_parameters())


class BiasNames(nn.Module):
    """Parameters whose names hold "bias" without being one: MHA's ``in_proj_bias`` and
    ``bias_k``/``bias_v``, a custom ``scale_bias``; and true ``.bias`` parameters."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True, add_bias_kv=True)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)
        self.scale_bias = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.proj(self.norm(x))) * self.scale_bias


@pytest.mark.parametrize(
    "bias,expected",
    [
        ("all", {"attn.out_proj.bias", "head.bias", "norm.bias", "proj.bias"}),
        ("lora_only", {"proj.bias"}),
    ],
)
def test_trainable_biases_are_the_ones_peft_trains(bias, expected, tmp_path):
    """PEFT trains parameters named ``bias`` (``bias: all``) or the targets' biases
    (``lora_only``); ``in_proj_bias``, ``bias_k`` and ``scale_bias`` stay frozen."""
    model = BiasNames()
    spec = adaptc.load_spec(_spec({"kind": "names", "names": ["proj"]}, {"bias": bias}))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    compiled = adaptc.compile(model, spec)

    def base_names(m: nn.Module) -> set[str]:
        names = (n for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n)
        return {n.removeprefix("base_model.model.").replace(".base_layer.", ".") for n in names}

    assert base_names(peft_model) == base_names(compiled) == expected
    assert {n for n, _ in adaptc.build_plan(model, spec).trainable_biases} == expected
    assert adaptc.trainable_parameters(compiled) == tuple(peft_model.get_nb_trainable_parameters())
    adaptc.save_adapter(compiled, tmp_path / "ours")
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs")]
    assert set(files[0]) == set(files[1])


def test_seed_custom_dummy_model_matches_peft():
    """The seed's third example: inject_adapter_in_model on the custom DummyModel."""
    model = DummyModel()
    data = _spec(
        {"kind": "names", "names": ["linear"]},
        {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none"},
    )
    spec = adaptc.load_spec(data)
    injected = peft.inject_adapter_in_model(peft_config(spec), copy.deepcopy(model))
    compiled = adaptc.compile(model, spec)
    share_adapter_weights(injected, compiled)
    ids = torch.arange(10).view(2, 5)
    injected.eval()
    compiled.eval()
    torch.testing.assert_close(compiled(ids), injected(ids), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_data_driven_init_matches_peft_without_copying(init):
    """PiSSA and OLoRA are deterministic: same factors and same residual base as peft."""
    model = NestedMLP(dim=12)
    spec = adaptc.load_spec(
        _spec({"kind": "names", "names": ["fc1", "fc2"]}, {"r": 4, "init": init})
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    compiled = adaptc.compile(model, spec)
    x = torch.randn(3, 12)
    torch.testing.assert_close(compiled(x), peft_model(x), rtol=1e-5, atol=1e-5)
    ours = compiled.blocks[0]["fc1"]
    theirs = peft_model.base_model.model.blocks[0]["fc1"]
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ours.lora_default.lora_B.weight, theirs.lora_B["default"].weight, rtol=1e-5, atol=1e-6
    )


def test_custom_nested_model_matches_peft_in_training_mode_without_dropout():
    model = NestedMLP()
    peft_model, compiled = build_pair(
        model, _spec({"kind": "names", "names": ["fc1", "head"]}, {"r": 3, "use_rslora": True})
    )
    x = torch.randn(4, 12)
    peft_model.train()
    compiled.train()
    torch.testing.assert_close(compiled(x), peft_model(x), **TOL)


@pytest.mark.parametrize("init", ["default", "gaussian", "random"])
@pytest.mark.parametrize("family", ["opt", "llama", "cnn"])
def test_same_seed_draws_the_same_adapter_weights_as_peft(family, init):
    """Branches are built in PEFT's order, drawing from the RNG as PEFT does."""
    if family == "cnn":
        model = SmallCNN()
        targets = {"kind": "names", "names": ["conv1", "conv2", "conv3", "head"]}
    else:
        model = tiny_hf(family)
        names = FAMILY_TARGETS[family] + ["embed_tokens"] * (init != "gaussian")
        targets = {"kind": "names", "names": names}
    spec = adaptc.load_spec(_spec(targets, {"r": 4, "init": init}))
    torch.manual_seed(123)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    torch.manual_seed(123)
    compiled = adaptc.compile(model, spec)
    layers = {
        name.removeprefix("base_model.model."): m
        for name, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    for branch in [m for m in compiled.modules() if isinstance(m, LoraBranch)]:
        theirs = dict(layers[branch.target].named_parameters())
        for name, param in branch.named_parameters():
            head, _, tail = name.partition(".")
            key = f"{head}.default.{tail}" if tail else f"{head}.default"
            torch.testing.assert_close(param, theirs[key], rtol=0, atol=0, msg=name)


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)
        self.conv3 = torch.nn.Conv1d(8, 4, 3, stride=2)
        self.head = torch.nn.Linear(4 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, 8, 8)
        x = self.conv3(x.flatten(2)[..., :16])  # (B, 4, 7)
        return self.head(x.flatten(1))


@pytest.mark.parametrize(
    "fields", [{"r": 2}, {"r": 2, "use_dora": True}, {"r": 2, "lora_bias": True}]
)
def test_cnn_matches_peft(fields):
    model = SmallCNN()
    targets = {"kind": "types", "types": ["nn.Conv2d", "nn.Conv1d", "nn.Linear"]}
    spec = adaptc.load_spec(_spec(targets, fields))
    names = [t.path for t in adaptc.build_plan(model, spec).targets]
    config = peft.LoraConfig(target_modules=names, **{k: v for k, v in fields.items()})
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    compiled = adaptc.compile(model, spec)
    share_adapter_weights(peft_model, compiled)
    assert isinstance(compiled, torch.fx.GraphModule)  # a CNN traces whole
    x = torch.randn(2, 3, 8, 8)
    _compare_plain(peft_model, compiled, x)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_embedding_targets_match_peft(family):
    model = tiny_hf(family)
    names = ["embed_tokens", "q_proj"]
    peft_model, compiled = build_pair(model, _spec({"kind": "names", "names": names}, {"r": 3}))
    _compare(peft_model, compiled, hf_inputs(family))


def _compare_plain(peft_model, compiled, x):
    peft_model.eval()
    compiled.eval()
    ours, theirs = compiled(x), peft_model(x)
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    grads = adapter_grads(compiled)
    for key, expected in peft_grads(peft_model, grads).items():
        torch.testing.assert_close(grads[key], expected, rtol=1e-5, atol=1e-6, msg=str(key))


def test_a_target_called_with_more_than_one_argument_matches_peft():
    """OPT's positional embedding (an nn.Embedding subclass) is called with the attention
    mask, the cache length and position ids; the wrapper passes them all on, and the
    branch reads the first, as PEFT's layer does."""
    model = tiny_hf("opt").eval()
    spec = {
        "version": 1,
        "adapters": {
            "default": {"r": 4, "targets": {"kind": "names", "names": ["embed_positions"]}}
        },
    }
    peft_model, compiled = build_pair(model, spec)
    x = hf_inputs("opt")
    with torch.no_grad():
        ours = output_tensor(compiled(**x))
        theirs = output_tensor(peft_model(**x))
    torch.testing.assert_close(ours, theirs, **TOL)
