"""LoRA on ``nn.MultiheadAttention``, against the real ``peft`` 0.21.2.

A small model with one attention layer (batch-first or sequence-first, self-attention or
cross-attention, with and without a mask), targeted by name. PEFT's adapter is drawn at
random (``init_lora_weights=False``), saved with ``save_pretrained`` and loaded by adaptc,
so both sides hold the same weights and must agree to float32 rounding: outputs,
gradients of the LoRA weights, merged weights, trainable counts, files both ways. PEFT's
``out_proj`` update counts twice (see :mod:`adaptc.methods.lora.mha`); the tests hold
adaptc to it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import fx, nn

import adaptc
from adaptc.adapters import adapter_tensors, hotswap_tensors
from adaptc.methods.lora.mha import MultiheadAttentionBranch, adapted_attention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
E, HEADS, T, B = 16, 4, 5, 3
R, ALPHA = 2, 4  # scaling 2


class SelfAttention(nn.Module):
    """LayerNorm → self-attention (weights returned, as by default) → residual → head."""

    def __init__(self, batch_first: bool = True, **mha: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **mha)
        self.head = nn.Linear(E, 3)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        out, weights = self.attn(h, h, h, attn_mask=mask)
        return self.head(out + x), weights


class CrossAttention(nn.Module):
    """Queries from ``x``, keys and values from ``memory``; no attention weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True, add_bias_kv=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, memory, memory, need_weights=False)
        return self.head(out)


class Untraceable(nn.Module):
    """A forward torch.fx cannot trace (it branches on a value): the layer gets a graph of
    its own."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.sum() > 0:
            x = x * 2
        return self.attn(x, x, x, need_weights=True, average_attn_weights=False)


def _inputs(batch_first: bool, gen: torch.Generator) -> torch.Tensor:
    shape = (B, T, E) if batch_first else (T, B, E)
    return torch.randn(shape, generator=gen)


def _causal() -> torch.Tensor:
    return torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True: masked


# name -> (model factory, inputs)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], tuple[Any, ...]]]] = {
    "batch-first": (lambda: SelfAttention(True), lambda g: (_inputs(True, g),)),
    "sequence-first": (lambda: SelfAttention(False), lambda g: (_inputs(False, g),)),
    "attn-mask": (lambda: SelfAttention(True), lambda g: (_inputs(True, g), _causal())),
    "no-bias-seq-first-mask": (
        lambda: SelfAttention(False, bias=False),
        lambda g: (_inputs(False, g), _causal()),
    ),
    "cross-bias-kv": (CrossAttention, lambda g: (_inputs(True, g), _inputs(True, g)[:, :4])),
    "untraceable-parent": (Untraceable, lambda g: (_inputs(False, g),)),
}


def peft_config(**overrides: Any) -> peft.LoraConfig:
    kwargs: dict[str, Any] = {
        "target_modules": ["attn"], "r": R, "lora_alpha": ALPHA, "init_lora_weights": False,
    }  # fmt: skip
    return peft.LoraConfig(**{**kwargs, **overrides})


def spec(**overrides: Any) -> dict[str, Any]:
    adapter = {"method": "lora", "r": R, "lora_alpha": ALPHA, "init": "random"}
    adapter["targets"] = {"kind": "names", "names": ["attn"]}
    return {"version": 1, "adapters": {"default": {**adapter, **overrides}}}


def base_model(case: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][0]().eval()


def inputs(case: str) -> tuple[Any, ...]:
    return CASES[case][1](torch.Generator().manual_seed(1))


def outputs(model: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(*args)
    return out if isinstance(out, tuple) else (out,)


def assert_outputs_close(ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def peft_pair(case: str, tmp_path: Path) -> tuple[nn.Module, nn.Module, Any]:
    """(base, adaptc's model with PEFT's adapter loaded from its files, PEFT's model)."""
    base = base_model(case)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config()).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = adaptc.load_adapter(base, tmp_path / "theirs", trainable=True)
    return base, ours, theirs


def peft_params(theirs: Any) -> dict[str, nn.Parameter]:
    """PEFT's trainable parameters by their adapter-file key."""
    return {n.replace(".default", ""): p for n, p in theirs.named_parameters() if p.requires_grad}


def file_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


# --- outputs, gradients, counts ---------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_peft(case: str, tmp_path: Path) -> None:
    base, ours, theirs = peft_pair(case, tmp_path)
    args = inputs(case)
    expected = outputs(theirs, args)
    assert not torch.allclose(expected[0], outputs(base, args)[0], atol=1e-3)  # it adapts
    assert_outputs_close(outputs(ours, args), expected)
    ours.train()  # no dropout anywhere: the slow path, the same numbers
    theirs.train()
    assert_outputs_close(outputs(ours, args), outputs(theirs, args))


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_peft(case: str, tmp_path: Path) -> None:
    _, ours, theirs = peft_pair(case, tmp_path)
    args = inputs(case)
    for model in (ours, theirs):
        model.train()
        out = model(*args)
        out = out if isinstance(out, tuple) else (out,)
        weights = torch.Generator().manual_seed(5)
        sum(  # type: ignore[misc]
            (o * torch.randn(o.shape, generator=weights)).sum() for o in out
        ).backward()
    mine = dict(adapter_tensors(ours, "default"))
    reference = peft_params(theirs)
    assert sorted(mine) == sorted(reference) and len(mine) == 4
    for key, param in mine.items():
        assert param.grad is not None and reference[key].grad is not None, key
        assert param.grad.abs().sum() > 0, key
        torch.testing.assert_close(param.grad, reference[key].grad, **EXACT)


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_counts_match_peft(case: str, tmp_path: Path) -> None:
    base, ours, theirs = peft_pair(case, tmp_path)
    expected = theirs.get_nb_trainable_parameters()
    assert adaptc.trainable_parameters(ours) == expected
    assert expected[0] == 6 * R * E  # A (r, E) and B (3E, r); A_o (r, E) and B_o (E, r)
    plan = adaptc.build_plan(base, spec())
    assert (plan.trainable_params, plan.total_params) == expected
    with torch.device("meta"):
        meta = CASES[case][0]()
    plan = adaptc.build_plan(meta, spec())
    assert (plan.trainable_params, plan.total_params) == expected
    (target,) = plan.targets
    assert (target.layer_type, target.in_features, target.out_features) == (
        "nn.MultiheadAttention", E, 3 * E,
    )  # fmt: skip


@pytest.mark.parametrize("rank_pattern", [{}, {"attn": 3}])
def test_rank_and_alpha_patterns_count_as_in_peft(rank_pattern: dict[str, int]) -> None:
    base = base_model("batch-first")
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft_config(rank_pattern=rank_pattern, alpha_pattern={"attn": 9})
    )
    ours = adaptc.compile(base, spec(rank_pattern=rank_pattern, alpha_pattern={"attn": 9}))
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    (branch,) = [m for m in ours.modules() if isinstance(m, MultiheadAttentionBranch)]
    layer = theirs.base_model.model.attn
    assert (branch.r, branch.scaling) == (layer.r["default"], layer.scaling["default"])


@pytest.mark.parametrize("init", ["default", "gaussian", "random"])
def test_same_seed_same_weights_as_peft(init: str) -> None:
    base = base_model("batch-first")
    torch.manual_seed(3)
    ours = adaptc.compile(base, spec(init=init))
    after_ours = torch.randn(3)
    torch.manual_seed(3)
    value = {"default": True, "random": False}.get(init, init)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(init_lora_weights=value))
    after_theirs = torch.randn(3)
    reference = peft_params(theirs)
    mine = dict(adapter_tensors(ours, "default"))
    assert sorted(mine) == sorted(reference)
    for key, param in mine.items():
        assert torch.equal(param, reference[key]), key
    assert torch.equal(after_ours, after_theirs)


def test_dropout_is_ignored_as_in_peft(tmp_path: Path) -> None:
    base = base_model("batch-first")
    args = inputs("batch-first")
    with pytest.warns(adaptc.AdaptcWarning, match="lora_dropout is not applied"):
        ours = adaptc.compile(base, spec(lora_dropout=0.5))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(lora_dropout=0.5))
    theirs.save_pretrained(str(tmp_path))
    loaded = adaptc.load_adapter(base, tmp_path, trainable=True)
    loaded.train()
    theirs.train()
    assert_outputs_close(outputs(loaded, args), outputs(theirs, args))
    assert not any(isinstance(m, nn.Dropout) for m in ours.modules())


def test_bfloat16_base_matches_peft(tmp_path: Path) -> None:
    base = base_model("batch-first").to(torch.bfloat16)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config()).eval()
    theirs.save_pretrained(str(tmp_path))
    ours = adaptc.load_adapter(base, tmp_path)
    args = (inputs("batch-first")[0].to(torch.bfloat16),)
    mine, reference = outputs(ours, args), outputs(theirs, args)
    assert mine[0].dtype == torch.bfloat16
    for a, b in zip(mine, reference, strict=True):
        assert torch.equal(a, b)
    for key, param in adapter_tensors(ours, "default"):  # PEFT's autocast_adapter_dtype
        assert param.dtype == torch.float32, key


# --- the graph ----------------------------------------------------------------------------


def test_the_graph_calls_the_layer_with_adapted_weights() -> None:
    base = base_model("batch-first")
    ours = adaptc.compile(base, spec())
    assert isinstance(ours, fx.GraphModule)
    calls = [n for n in ours.graph.nodes if n.target is adapted_attention]
    assert len(calls) == 1 and calls[0].op == "call_function"
    assert not any(n.op == "call_module" and n.target == "attn" for n in ours.graph.nodes)
    attention = ours.get_submodule("attn")
    assert type(attention) is nn.MultiheadAttention  # a leaf, not traced into
    own = {n for n, _ in attention.named_parameters() if not n.startswith("lora_")}
    assert own == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    for name in own:  # shared with the user's model, frozen, never written
        mine, theirs = attention.get_parameter(name), base.attn.get_parameter(name)
        assert mine is not theirs and mine.data_ptr() == theirs.data_ptr()
        assert not mine.requires_grad
    adapters = {n.meta.get("adaptc", {}).get("adapter") for n in ours.graph.nodes}
    assert "default" in adapters
    args = inputs("batch-first")
    assert_outputs_close(outputs(copy.deepcopy(ours), args), outputs(ours, args))


@pytest.mark.parametrize("case", ["attn-mask", "cross-bias-kv", "untraceable-parent"])
def test_compiled_models_pickle_with_torch_save(case: str, tmp_path: Path) -> None:
    _, ours, _ = peft_pair(case, tmp_path)
    torch.save(ours, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    args = inputs(case)
    assert_outputs_close(outputs(again, args), outputs(ours, args))


def test_a_layer_without_a_traceable_parent_gets_a_graph_of_its_own(tmp_path: Path) -> None:
    _, ours, _ = peft_pair("untraceable-parent", tmp_path)
    layer = ours.get_submodule("attn")
    assert isinstance(layer, fx.GraphModule)
    assert type(layer.get_submodule("base_layer")) is nn.MultiheadAttention
    assert [n.op for n in layer.graph.nodes if n.target is adapted_attention] == ["call_function"]


def test_two_adapters_stack_and_switch_as_in_peft(tmp_path: Path) -> None:
    base = base_model("attn-mask")
    args = inputs("attn-mask")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(), adapter_name="a")
    theirs.add_adapter("b", peft_config(r=3, lora_alpha=3))
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ours = adaptc.load_adapter(base, tmp_path / "a", adapter_name="a")
    adaptc.load_adapter_into(ours, tmp_path / "b", adapter_name="b")
    for active in (["a"], ["b"], ["a", "b"]):
        theirs.base_model.set_adapter(active)
        adaptc.set_active(ours, active)
        assert_outputs_close(outputs(ours, args), outputs(theirs, args))
    with adaptc.disabled(ours), theirs.disable_adapter():
        assert_outputs_close(outputs(ours, args), outputs(theirs, args))


# --- merge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["batch-first", "cross-bias-kv"])
def test_merge_matches_peft_merge_and_unload(case: str, tmp_path: Path) -> None:
    base, ours, theirs = peft_pair(case, tmp_path)
    args = inputs(case)
    before = outputs(ours, args)
    merged = adaptc.merge(ours)
    reference = theirs.merge_and_unload()
    attention = merged.get_submodule("attn")
    assert type(attention) is nn.MultiheadAttention
    assert not any(k.startswith("lora_") for k in attention._modules)
    for name in ("in_proj_weight", "out_proj.weight", "out_proj.bias", "in_proj_bias"):
        mine, theirs_p = attention.get_parameter(name), reference.attn.get_parameter(name)
        assert torch.equal(mine, theirs_p), name
    assert_outputs_close(outputs(merged, args), outputs(reference, args))
    assert_outputs_close(outputs(ours, args), before)  # the unmerged model is unchanged
    assert torch.equal(base.attn.in_proj_weight, reference.attn.in_proj_weight) is False
    assert torch.equal(ours.get_submodule("attn").in_proj_weight, base.attn.in_proj_weight)


def test_compile_with_merge_true_equals_merge() -> None:
    base = base_model("sequence-first")
    args = inputs("sequence-first")
    torch.manual_seed(4)
    ours = adaptc.compile(base, spec())
    torch.manual_seed(4)
    data = spec()
    data["merge"] = True
    merged = adaptc.compile(base, data)
    assert_outputs_close(outputs(merged, args), outputs(adaptc.merge(ours), args))


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["batch-first", "cross-bias-kv"])
def test_files_both_ways(case: str, tmp_path: Path) -> None:
    base, ours, theirs = peft_pair(case, tmp_path)
    args = inputs(case)
    adaptc.save_adapter(ours, tmp_path / "ours")
    assert (
        file_keys(tmp_path / "ours")
        == file_keys(tmp_path / "theirs")
        == [
            "base_model.model.attn.base_layer.out_proj.lora_A.weight",
            "base_model.model.attn.base_layer.out_proj.lora_B.weight",
            "base_model.model.attn.lora_A.weight",
            "base_model.model.attn.lora_B.weight",
        ]
    )
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    for key, tensor in reference.items():
        assert torch.equal(mine[key], tensor), key
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["target_modules"], config["r"], config["lora_alpha"]) == (["attn"], R, ALPHA)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_outputs_close(outputs(loaded, args), outputs(theirs, args))


# --- the original stays untouched ----------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": {n: (id(p), p.requires_grad, p.clone()) for n, p in model.named_parameters()},
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def test_original_model_is_untouched(tmp_path: Path) -> None:
    base = base_model("attn-mask")
    args = inputs("attn-mask")
    before = snapshot(base)
    reference = outputs(base, args)
    ours = adaptc.compile(base, spec())
    ours.train()
    sum(o.sum() for o in ours(*args)).backward()  # type: ignore[misc]
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0).step()
    adaptc.merge(ours)
    adaptc.save_adapter(ours, tmp_path)
    after = snapshot(base)
    assert before["modules"] == after["modules"] and before["attrs"] == after["attrs"]
    assert before["params"].keys() == after["params"].keys()
    for name, (i, grad, value) in before["params"].items():
        i2, grad2, value2 = after["params"][name]
        assert (i, grad) == (i2, grad2) and torch.equal(value, value2), name
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    assert all(p.grad is None for p in base.parameters())
    assert_outputs_close(outputs(base, args), reference)


# --- the facade ---------------------------------------------------------------------------------


def test_facade_get_peft_model_matches_peft(tmp_path: Path) -> None:
    from adaptc.peft import LoraConfig, get_peft_model

    base = base_model("batch-first")
    args = inputs("batch-first")
    kwargs = {"target_modules": ["attn"], "r": R, "lora_alpha": ALPHA, "init_lora_weights": False}
    torch.manual_seed(6)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs)).eval()
    torch.manual_seed(6)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    lines = []
    for model in (ours, theirs):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        lines.append(buffer.getvalue())
    assert lines[0] == lines[1]
    assert_outputs_close(outputs(ours, args), outputs(theirs, args))
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    merged = ours.merge_and_unload()
    assert_outputs_close(outputs(merged, args), outputs(theirs.merge_and_unload(), args))


# --- what is refused -----------------------------------------------------------------------------

REFUSED: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # name: (spec fields, module arguments, message); PEFT refuses the first two as well
    "dora": ({"use_dora": True}, {}, "attn: nn.MultiheadAttention does not support DoRA"),
    "kdim": ({}, {"kdim": 8, "vdim": 8}, "attn: nn.MultiheadAttention has query/key/value of"),
    "pissa": ({"init": "pissa"}, {}, "attn: nn.MultiheadAttention does not support init 'pissa'"),
    "lora_bias": ({"lora_bias": True}, {}, "does not support lora_bias"),
    "bias-all": ({"bias": "all"}, {}, "does not support bias 'all'"),
    "bias-lora-only": ({"bias": "lora_only"}, {}, "does not support bias 'lora_only'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_a_one_line_message(case: str) -> None:
    fields, module_args, message = REFUSED[case]
    torch.manual_seed(0)
    base = SelfAttention(True, **module_args)
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.compile(base, spec(**fields))
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        adaptc.build_plan(base, spec(**fields))


def test_peft_refuses_dora_and_separate_kdim_too() -> None:
    with pytest.raises(ValueError, match="does not support DoRA"):
        peft.get_peft_model(SelfAttention(True), peft_config(use_dora=True))
    with pytest.raises(ValueError, match="Only same"):
        peft.get_peft_model(SelfAttention(True, kdim=8, vdim=8), peft_config())


def two_adapters() -> nn.Module:
    data = spec()
    data["adapters"]["other"] = {**data["adapters"]["default"], "lora_alpha": 8}
    return adaptc.compile(base_model("batch-first"), data)


MESSAGE = "attn: LoRA on nn.MultiheadAttention has two factor pairs"


def test_mixed_batches_refuse_it() -> None:
    ours = two_adapters()
    args = inputs("batch-first")
    before = outputs(ours, args)
    with (
        pytest.raises(adaptc.MixedBatchError, match=MESSAGE),
        adaptc.mixed_batch(ours, ["default", "other", "default"]),
    ):
        pass
    assert_outputs_close(outputs(ours, args), before)


def test_hotswap_refuses_it() -> None:
    ours = two_adapters()
    with pytest.raises(adaptc.HotswapError, match=MESSAGE):
        adaptc.prepare_hotswap(ours, max_rank=8)
    state = dict(adapter_tensors(ours, "default"))
    with pytest.raises(adaptc.HotswapError, match=MESSAGE):
        hotswap_tensors(ours, adaptc.load_spec(spec()).adapters["default"], state)


def test_combine_refuses_it_and_leaves_nothing_behind() -> None:
    ours = two_adapters()
    args = inputs("batch-first")
    before = outputs(ours, args)
    for kind in ("cat", "linear", "svd"):
        with pytest.raises(ValueError, match=MESSAGE):
            adaptc.combine_adapters(ours, ["default", "other"], [1.0, 1.0], "both", kind)
    assert not any(getattr(m, "adapter", None) == "both" for m in ours.modules())
    assert_outputs_close(outputs(ours, args), before)


def test_ia3_names_the_type_it_does_not_support() -> None:
    data = {"method": "ia3", "targets": {"kind": "names", "names": ["attn"]}}
    data["feedforward"] = {"kind": "none"}
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.compile(base_model("batch-first"), {"version": 1, "adapters": {"default": data}})
    assert (
        "module 'attn' (MultiheadAttention) is selected by targets.names [attn], but IA3 "
        "does not support its type; supported: " in str(info.value)
    )
