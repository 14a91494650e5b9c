"""LoRA's ``init: orthogonal`` and ``init: mica`` against the real ``peft`` 0.21.2.

PEFT's ``init_lora_weights="orthogonal"`` draws its factors at random (a QR of a normal
(r, r) matrix, then two normal matrices), so that ``B·A = 0``; ``"mica"`` sets ``B`` to the
base weight's ``r`` minor left singular vectors, ``A = 0``, and freezes ``B``. Neither
changes the base weight. adaptc draws in PEFT's order, so the same seed gives the same
factors bit for bit; the tests also check the properties each init promises, the trainable
counts (MiCA's ``B`` does not train), files both ways, merging, the original model, and
the errors for what PEFT refuses.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import adaptc
import adaptc.peft as facade
from adaptc.adapters.keys import adapter_state_dict
from adaptc.methods.lora.branch import FrozenFactor, LoraBranch
from adaptc.spec import from_peft_config
from tests.compiler.models import hf_inputs, tiny_hf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
INITS = ["orthogonal", "mica"]
# linear layers and an embedding on Llama; transformers' Conv1D (fan_in_fan_out) on GPT-2
TARGETS = {"llama": ["embed_tokens", "q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
FAMILIES = list(TARGETS)


def spec(family: str, init: str, **fields: Any) -> dict[str, Any]:
    adapter = {"r": 4, "lora_alpha": 8, "init": init, **fields}
    adapter["targets"] = {"kind": "names", "names": TARGETS[family]}
    return {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": adapter}}


def peft_config(family: str, init: str, **fields: Any) -> peft.LoraConfig:
    return peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=init,
        target_modules=TARGETS[family], **fields,
    )  # fmt: skip


def logits(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**hf_inputs(family)).logits  # type: ignore[no-any-return]


def both(family: str, init: str, seed: int = 7, **fields: Any) -> tuple[nn.Module, nn.Module, Any]:
    """``(base, ours, theirs)``: the same base model adapted by each, from the same seed."""
    base = tiny_hf(family).eval()
    torch.manual_seed(seed)
    ours = adaptc.compile(base, spec(family, init, **fields)).eval()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(family, init, **fields)).eval()
    return base, ours, theirs


def branches(model: nn.Module) -> dict[str, LoraBranch]:
    return {m.target: m for m in model.modules() if isinstance(m, LoraBranch)}


def assert_same_tensors(ours: nn.Module, theirs: Any, **tol: float) -> None:
    mine, ref = adapter_state_dict(ours, "default"), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(ref)
    for key, value in ref.items():
        if tol:
            torch.testing.assert_close(mine[key], value, **tol)
        else:
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key


def requires_grad(model: nn.Module) -> dict[str, bool]:
    """``{"<target>.<lora tensor>": requires_grad}`` for PEFT's and for adaptc's factors."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.lora_default", "")
        out[name.replace(".lora_default", "").replace(".default", "")] = p.requires_grad
    return out


def train_step(model: nn.Module, family: str) -> None:
    """One SGD step on a language-modelling loss, over the parameters that train (in eval
    mode: GPT-2's dropout would draw differently in the two models)."""
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = hf_inputs(family)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimiser.step()
    optimiser.zero_grad()


def file_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": {n: (id(p), p.requires_grad, p.clone()) for n, p in model.named_parameters()},
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
    }


# --- the spec and PEFT's config ---------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
def test_peft_config_both_ways(init: str) -> None:
    expected = peft.LoraConfig(init_lora_weights=init, target_modules=["q_proj"]).to_dict()
    expected = {k: sorted(v) if isinstance(v, set) else v for k, v in expected.items()}
    spec_ = from_peft_config(expected)
    assert spec_.adapter().init == init
    assert spec_.to_peft_config() == expected
    assert adaptc.load_spec(spec("llama", init)).to_peft_config()["init_lora_weights"] == init
    config = facade.LoraConfig(init_lora_weights=init, target_modules=["q_proj"])
    assert config.to_spec().adapter().init == init


# --- initial factors: PEFT's, bit for bit, and the properties they promise --------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", INITS)
def test_same_seed_same_factors_as_peft(family: str, init: str) -> None:
    base = tiny_hf(family).eval()
    torch.manual_seed(3)
    ours = adaptc.compile(base, spec(family, init))
    after_ours = torch.randn(3)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(family, init))
    after_theirs = torch.randn(3)
    assert_same_tensors(ours, theirs)
    assert torch.equal(after_ours, after_theirs)  # the same numbers drawn, in the same order


def test_orthogonal_with_dora_matches_peft() -> None:
    _, ours, theirs = both("llama", "orthogonal", use_dora=True)
    assert any("lora_magnitude_vector" in k for k in adapter_state_dict(ours, "default"))
    assert_same_tensors(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_orthogonal_factors_have_orthogonal_halves_and_start_as_a_no_op(family: str) -> None:
    base, ours, theirs = both(family, "orthogonal")
    for path, branch in branches(ours).items():
        A, B = branch.factors()  # (r, in), (out, r); an embedding's are PEFT's default
        if path.endswith("embed_tokens"):
            assert torch.count_nonzero(A) == 0
            continue
        assert torch.linalg.matrix_rank(A) == 2 and torch.linalg.matrix_rank(B) == 2  # r / 2
        assert (B @ A).abs().max() < 1e-7, path
        assert A.abs().max() < 1 and B.abs().max() < 1  # scaled by 1/10
    torch.testing.assert_close(logits(ours, family), logits(base, family), **EXACT)
    torch.testing.assert_close(logits(ours, family), logits(theirs, family), **EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_mica_factors_are_the_minor_singular_vectors_and_zero(family: str) -> None:
    base, ours, _ = both(family, "mica")
    layers = dict(base.named_modules())
    for path, branch in branches(ours).items():
        A, B = branch.factors()
        weight = layers[path].weight.detach()
        # (out, in) as PEFT factors it: Conv1D stores (in, out), an embedding (num, dim)
        W = weight if isinstance(layers[path], nn.Linear) else weight.T
        assert torch.count_nonzero(A) == 0
        torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)
        minor = torch.linalg.svdvals(W)[-4:]
        torch.testing.assert_close(torch.linalg.svdvals(B.T @ W), minor, rtol=1e-4, atol=1e-5)
        assert isinstance(B, FrozenFactor) and not B.requires_grad and A.requires_grad
        # the base weight is shared with the user's model, not replaced
        shared = dict(ours.named_modules())[path].weight
        assert shared.data_ptr() == layers[path].weight.data_ptr()
    assert torch.equal(logits(ours, family), logits(base, family))  # B·A = 0 exactly


@pytest.mark.parametrize("init", INITS)
def test_bfloat16_base_gets_float32_factors_rounded_as_peft(init: str) -> None:
    """Both inits round their factors to the base weight's dtype, and PEFT then upcasts
    them (``autocast_adapter_dtype``). (The embedding is left out for ``orthogonal``: it
    gets the default init there, which is not what this test is about.)"""
    base = tiny_hf("llama").to(torch.bfloat16).eval()
    targets = TARGETS["llama"][int(init == "orthogonal") :]
    ours_spec = spec("llama", init)
    ours_spec["adapters"]["default"]["targets"]["names"] = targets
    torch.manual_seed(5)
    ours = adaptc.compile(base, ours_spec)
    torch.manual_seed(5)
    config = peft_config("llama", init)
    config.target_modules = set(targets)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert_same_tensors(ours, theirs)  # float32, holding PEFT's bfloat16-rounded values
    assert all(b.factors()[1].dtype == torch.float32 for b in branches(ours).values())


def test_orthogonal_on_an_embedding_is_the_default_init_with_a_warning() -> None:
    """PEFT's embeddings have no orthogonal init: they get the default (A = 0, B normal)."""
    with pytest.warns(adaptc.AdaptcWarning, match="init 'orthogonal' does not apply to"):
        adaptc.compile(tiny_hf("llama"), spec("llama", "orthogonal"))


# --- what trains ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", INITS)
def test_trainable_counts_match_peft(family: str, init: str, capsys: Any) -> None:
    base, ours, theirs = both(family, init)
    expected = theirs.get_nb_trainable_parameters()
    assert adaptc.trainable_parameters(ours) == expected
    plan = adaptc.build_plan(base, spec(family, init))
    assert (plan.trainable_params, plan.total_params) == expected
    frozen = sum(b.factors()[1].numel() for b in branches(ours).values()) if init == "mica" else 0
    assert plan.frozen_params == frozen and plan.to_dict()["frozen_params"] == frozen
    with torch.device("meta"):
        meta = tiny_hf(family)
    meta_plan = adaptc.build_plan(meta, spec(family, init))
    assert (meta_plan.trainable_params, meta_plan.total_params) == expected
    capsys.readouterr()
    adaptc.print_trainable_parameters(ours)
    line = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out == line  # PEFT's line, to the digit


@pytest.mark.parametrize("init", INITS)
def test_which_factors_train_is_peft_s(init: str) -> None:
    _, ours, theirs = both("llama", init)
    expected = requires_grad(theirs)
    assert requires_grad(ours) == expected
    assert {k: v for k, v in expected.items() if "_B" in k} == {
        k: init != "mica" for k in expected if "_B" in k
    }
    ours.requires_grad_(True)  # what activating or loading an adapter trainable does
    assert requires_grad(ours) == expected


@pytest.mark.parametrize("init", INITS)
def test_the_facade_keeps_mica_s_B_frozen(init: str) -> None:
    base = tiny_hf("llama").eval()
    torch.manual_seed(1)
    ours = facade.get_peft_model(copy.deepcopy(base), facade.LoraConfig(**_kwargs(init)))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kwargs(init)))
    for model in (ours, theirs):
        model.set_adapter("default")
        model.disable_adapter_layers()
        model.enable_adapter_layers()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert requires_grad(ours) == requires_grad(theirs)
    torch.testing.assert_close(logits(ours, "llama"), logits(theirs, "llama"), **EXACT)


def _kwargs(init: str) -> dict[str, Any]:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": init, "target_modules": TARGETS["llama"]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", INITS)
def test_a_training_step_and_the_merge_match_peft(family: str, init: str) -> None:
    _, ours, theirs = both(family, init)
    before = {path: [f.clone() for f in b.factors()] for path, b in branches(ours).items()}
    train_step(ours, family)
    train_step(theirs, family)
    for path, branch in branches(ours).items():
        (A0, B0), (A, B) = before[path], branch.factors()
        assert not torch.equal(A, A0), path  # A always trains
        if init == "mica":
            assert B.grad is None and torch.equal(B, B0), path
        elif not path.endswith("embed_tokens"):  # (its A starts at 0: B gets no gradient)
            assert not torch.equal(B, B0), path
    assert_same_tensors(ours, theirs, rtol=1e-5, atol=1e-6)
    expected = logits(theirs, family)
    torch.testing.assert_close(logits(ours, family), expected, rtol=1e-5, atol=1e-5)
    merged = adaptc.merge(ours)
    reference = logits(copy.deepcopy(theirs).merge_and_unload(), family)
    torch.testing.assert_close(logits(merged, family), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merged, family), expected, rtol=1e-5, atol=1e-5)


# --- files both ways --------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
def test_files_both_ways(init: str, tmp_path: Path) -> None:
    base, ours, theirs = both("llama", init)
    train_step(ours, "llama")
    train_step(theirs, "llama")
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    for name in ("ours", "theirs"):
        written = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert written["init_lora_weights"] == init, name
    # adaptc's files, read by peft (trainable: MiCA's B stays frozen there)
    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), str(tmp_path / "ours"), is_trainable=True
    ).eval()
    torch.testing.assert_close(logits(loaded, "llama"), logits(ours, "llama"), **EXACT)
    assert loaded.get_nb_trainable_parameters() == adaptc.trainable_parameters(ours)
    # peft's files, read by adaptc and by the facade
    back = adaptc.load_adapter(base, tmp_path / "theirs", trainable=True)
    torch.testing.assert_close(logits(back, "llama"), logits(theirs, "llama"), **EXACT)
    assert requires_grad(back) == requires_grad(loaded)
    assert adaptc.trainable_parameters(back) == loaded.get_nb_trainable_parameters()
    assert adaptc.trainable_parameters(adaptc.load_adapter(base, tmp_path / "theirs"))[0] == 0
    through = facade.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "theirs", is_trainable=True
    ).eval()
    torch.testing.assert_close(logits(through, "llama"), logits(theirs, "llama"), **EXACT)
    assert through.get_nb_trainable_parameters() == loaded.get_nb_trainable_parameters()


@pytest.mark.parametrize("init", INITS)
def test_the_original_model_is_untouched(init: str, tmp_path: Path) -> None:
    base = tiny_hf("llama").eval()
    before = snapshot(base)
    reference = logits(base, "llama")
    ours = adaptc.compile(base, spec("llama", init))
    train_step(ours, "llama")
    adaptc.merge(ours)
    adaptc.save_adapter(ours, tmp_path)
    adaptc.load_adapter(base, tmp_path, trainable=True)
    after = snapshot(base)
    assert before["modules"] == after["modules"] and before["attrs"] == after["attrs"]
    for name, (i, grad, value) in before["params"].items():
        i2, grad2, value2 = after["params"][name]
        assert (i, grad) == (i2, grad2) and torch.equal(value, value2), name
    assert torch.equal(logits(base, "llama"), reference)


# --- what PEFT refuses ------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]


V_PROJ = "model.layers.0.self_attn.v_proj"
REFUSED = [
    # (init, model, adapter fields, what peft raises, what adaptc says)
    (
        "orthogonal", "llama", {"r": 3},
        "Orthogonal initialization requires the LoRA rank to be even, got 3 instead.",
        "model.layers.0.self_attn.q_proj: init 'orthogonal' needs an even rank, got r=3",
    ),
    (
        "orthogonal", "llama", {"rank_pattern": {"v_proj": 3}},
        "Orthogonal initialization requires the LoRA rank to be even, got 3 instead.",
        f"{V_PROJ}: init 'orthogonal' needs an even rank, got r=3",
    ),
    (
        "mica", "llama", {"r": 12},
        "MiCA requires `r` <= min(in_features, out_features) but got r=12",
        f"{V_PROJ}: r=12 is larger than the layer allows for init 'mica' (min(in, out) = 8)",
    ),
    (
        "mica", "float64", {},
        "Please initialize MiCA under float32, float16, or bfloat16.",
        "model.layers.0.self_attn.q_proj: init 'mica' needs a float32, float16 or bfloat16 "
        "base weight, not torch.float64",
    ),
    (
        "orthogonal", "conv", {},
        "Unknown initialization init_lora_weights='orthogonal'",
        "conv: init 'orthogonal' is not supported for Conv2d (PEFT only has default, gaussian "
        "and random init for convolutions)",
    ),
    (
        "mica", "conv", {},
        "Invalid or unsupported variant combination: ('mica',)",
        "conv: init 'mica' is not supported for Conv2d (PEFT only has default, gaussian and "
        "random init for convolutions)",
    ),
]  # fmt: skip


def _model(name: str) -> nn.Module:
    if name == "conv":
        torch.manual_seed(0)
        return ConvNet()
    model = tiny_hf("llama")
    return model.double() if name == "float64" else model


@pytest.mark.parametrize(("init", "model", "fields", "theirs", "ours"), REFUSED)
def test_what_peft_refuses_on_a_layer_adaptc_refuses_saying_where(
    init: str, model: str, fields: dict[str, Any], theirs: str, ours: str
) -> None:
    targets = ["conv"] if model == "conv" else ["q_proj", "v_proj"]
    config = {"r": 4, "init_lora_weights": init, "target_modules": targets, **fields}
    with pytest.raises((ValueError, TypeError)) as peft_error:
        peft.get_peft_model(_model(model), peft.LoraConfig(**config))
    assert str(peft_error.value).startswith(theirs)
    adapter = {"r": 4, "init": init, "targets": {"kind": "names", "names": targets}, **fields}
    with pytest.raises(adaptc.CompileError) as error:
        adaptc.compile(_model(model), {"version": 1, "adapters": {"default": adapter}})
    assert str(error.value) == ours
    with pytest.raises(ValueError) as facade_error:
        facade.get_peft_model(_model(model), facade.LoraConfig(**config))
    assert ours in str(facade_error.value)


@pytest.mark.parametrize(
    ("fields", "peft_message", "spec_message", "config_message"),
    [
        (
            {"init": "mica", "use_dora": True},
            "Invalid or unsupported variant combination: ('mica', 'use_dora')",
            "adapters.default.init: init 'mica' cannot be combined with use_dora",
            "init_lora_weights: init 'mica' cannot be combined with use_dora",
        ),
        (
            {"init": "mica", "lora_bias": True},
            "The argument lora_bias=True is only supported with init_lora_weights=True or False",
            "adapters.default.lora_bias: lora_bias needs init 'default' or 'random', not 'mica'",
            "lora_bias: lora_bias needs init 'default' or 'random', not 'mica'",
        ),
        (
            {"init": "orthogonal", "lora_bias": True},
            "The argument lora_bias=True is only supported with init_lora_weights=True or False",
            "adapters.default.lora_bias: lora_bias needs init 'default' or 'random', not "
            "'orthogonal'",
            "lora_bias: lora_bias needs init 'default' or 'random', not 'orthogonal'",
        ),
    ],
)
def test_what_peft_refuses_in_a_config_adaptc_refuses_in_the_spec(
    fields: dict[str, Any], peft_message: str, spec_message: str, config_message: str
) -> None:
    kwargs = {k: v for k, v in fields.items() if k != "init"}
    with pytest.raises(ValueError) as peft_error:  # LoraConfig, or get_peft_model for MiCA + DoRA
        config = peft.LoraConfig(
            init_lora_weights=fields["init"], target_modules=["q_proj"], **kwargs
        )
        peft.get_peft_model(tiny_hf("llama"), config)
    assert str(peft_error.value).startswith(peft_message)
    with pytest.raises(adaptc.SpecError) as error:
        adaptc.load_spec({"version": 1, "adapters": {"default": fields}})
    assert str(error.value) == spec_message
    with pytest.raises(adaptc.SpecError) as facade_error:
        facade.LoraConfig(init_lora_weights=fields["init"], target_modules=["q_proj"], **kwargs)
    assert str(facade_error.value) == config_message
