"""Combining adapters (``combine_adapters``), checked against peft's ``add_weighted_adapter``.

Each case compiles two adapters with adaptc and with real peft, gives both the same weights,
combines them in both under the same seed and compares the new adapter's factors on every
target and the model's outputs with it active.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adaptc
from adaptc.adapters.combine import COMBINATION_TYPES, combine_adapters, factors
from adaptc.compiler.compile import compiled_info
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import (
    branches,
    lora_layers,
    output_tensor,
    peft_config,
    share_adapter_weights,
)
from tests.compiler.test_untouched import assert_same, snapshot

TOL = {"rtol": 1e-6, "atol": 1e-6}
PRUNING = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


class Mixed(nn.Module):
    """Every layer kind a combination handles: embedding, 3×3 and 1×1 Conv2d, Conv1D, Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.pw = nn.Conv2d(6, 6, 1)
        self.proj = Conv1D(6, 6)  # (in, out) weight: fan_in_fan_out
        self.fc = nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).permute(0, 3, 1, 2)  # (B, 8, H, W)
        x = self.pw(torch.relu(self.conv(x)))  # (B, 6, H, W)
        return self.fc(torch.tanh(self.proj(x.mean(dim=(2, 3)))))  # (B, 5)


def adapters(a: dict[str, Any], b: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, **top, "adapters": {"one": a, "two": b}}


def names(*targets: str, **fields: Any) -> dict[str, Any]:
    return {"targets": {"kind": "names", "names": list(targets)}, **fields}


def build(model: nn.Module, data: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """peft and adaptc models with the same adapters and the same (random) weights."""
    spec = adaptc.load_spec(data)
    first, *others = spec.adapters
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config(spec, first), first)
    for name in others:
        theirs.add_adapter(name, peft_config(spec, name))
    ours = adaptc.compile(model, spec)
    share_adapter_weights(theirs, ours)
    return theirs.eval(), ours.eval()


def combine_both(theirs: nn.Module, ours: nn.Module, *args: Any, **kwargs: Any) -> None:
    torch.manual_seed(1234)
    theirs.add_weighted_adapter(*args, **kwargs)
    torch.manual_seed(1234)
    combine_adapters(ours, *args, **kwargs)


def peft_factors(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def assert_same_adapter(
    theirs: nn.Module, ours: nn.Module, name: str, inputs: dict[str, Any], *, exact: bool = True
) -> None:
    """Same factors per target (or, ``exact=False``, the same ``B·A``), and the same outputs."""
    layers = lora_layers(theirs)
    mine = {t: b for (t, a), b in branches(ours).items() if a == name}
    assert set(mine) == {t for t, layer in layers.items() if name in layer.scaling}
    for target, branch in mine.items():
        A, B = factors(branch)
        peft_A, peft_B = peft_factors(layers[target], name)
        assert branch.scaling == layers[target].scaling[name]
        if exact:
            torch.testing.assert_close(A, peft_A, **TOL)
            torch.testing.assert_close(B, peft_B, **TOL)
        else:  # peft's factors have a smaller rank there: compare the products
            product = (B.flatten(1) @ A.flatten(1), peft_B.flatten(1) @ peft_A.flatten(1))
            torch.testing.assert_close(*product, **TOL)
    theirs.set_adapter(name)
    adaptc.set_active(ours, name)
    with torch.no_grad():
        torch.testing.assert_close(
            output_tensor(ours(**inputs)), output_tensor(theirs(**inputs)), **TOL
        )


def type_kwargs(kind: str) -> dict[str, Any]:
    return {"density": 0.5} if kind.removesuffix("_svd") in PRUNING else {}


@pytest.mark.parametrize("kind", COMBINATION_TYPES)
def test_every_type_matches_peft(kind):
    same_rank = kind in ("linear", *PRUNING)
    data = adapters(
        names("q_proj", "v_proj", r=4), names("v_proj", "up_proj", r=4 if same_rank else 8)
    )
    theirs, ours = build(tiny_hf("llama").eval(), data)
    combine_both(theirs, ours, ["one", "two"], [0.7, -0.4], "mix", kind, **type_kwargs(kind))
    assert adaptc.active_adapters(ours) == ("one",)  # the new adapter starts inactive
    expected = {"cat": 12, "linear": 4}.get(kind, 4 if same_rank else 8)
    assert compiled_info(ours).spec.adapters["mix"].r == expected
    assert_same_adapter(theirs, ours, "mix", hf_inputs("llama"))


@pytest.mark.parametrize("kind", ["cat", "svd", "linear", "ties_svd", "dare_linear"])
def test_embedding_conv_and_conv1d_layers_match_peft(kind):
    targets = ["emb", "conv", "pw", "proj", "fc"]
    same_rank = kind in ("linear", "dare_linear")
    data = adapters(names(*targets, r=2), names(*targets[1:], r=2 if same_rank else 4))
    theirs, ours = build(Mixed().eval(), data)
    combine_both(theirs, ours, ["one", "two"], [0.5, 1.5], "mix", kind, **type_kwargs(kind))
    ids = torch.randint(0, 20, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    assert_same_adapter(theirs, ours, "mix", {"ids": ids})


@pytest.mark.parametrize(
    ("kwargs", "exact"),
    [
        ({"svd_clamp": 0.8}, True),
        ({"svd_rank": 3, "svd_full_matrices": False}, True),
        # v_proj is 16 → 8: peft's factors get rank 8; adaptc pads them to r = 12 with zeros
        ({"svd_rank": 12, "svd_full_matrices": False}, False),
        (
            {"combination_type": "ties_svd", "density": 0.3, "majority_sign_method": "frequency"},
            True,
        ),
        (
            {"combination_type": "dare_ties", "density": 0.7, "majority_sign_method": "frequency"},
            True,
        ),
    ],
)
def test_svd_and_sign_options_match_peft(kwargs, exact):
    data = adapters(names("q_proj", "v_proj", r=4), names("q_proj", "v_proj", r=4))
    theirs, ours = build(tiny_hf("llama").eval(), data)
    combine_both(theirs, ours, ["one", "two"], [1.0, 0.6], "mix", **kwargs)
    assert_same_adapter(theirs, ours, "mix", hf_inputs("llama"), exact=exact)


def test_rank_pattern_dora_and_rslora_follow_peft():
    # linear on ranks from rank_pattern: peft shrinks v_proj's factors to r=2, adaptc pads
    data = adapters(
        names("q_proj", "v_proj", r=4, rank_pattern={"v_proj": 2}),
        names("q_proj", "v_proj", r=4, rank_pattern={"v_proj": 2}),
    )
    theirs, ours = build(tiny_hf("llama").eval(), data)
    combine_both(theirs, ours, ["one", "two"], [0.3, 0.9], "lin", "linear")
    assert_same_adapter(theirs, ours, "lin", hf_inputs("llama"), exact=False)
    # the first adapter's settings carry over: DoRA (magnitude ‖W‖) and rsLoRA (scale √r)
    data = adapters(names("q_proj", r=2, use_dora=True, use_rslora=True), names("q_proj", r=4))
    theirs, ours = build(tiny_hf("llama").eval(), data)
    combine_both(theirs, ours, ["one", "two"], [0.3, 0.9], "mix", "svd")
    assert_same_adapter(theirs, ours, "mix", hf_inputs("llama"))


def test_one_adapter_is_a_linear_mix_and_targets_are_united():
    data = adapters(names("q_proj", r=4), names("v_proj", r=4))
    theirs, ours = build(tiny_hf("opt").eval(), data)
    combine_both(theirs, ours, ["two"], [2.0], "twice", "svd")  # one adapter: linear, r = 4
    assert_same_adapter(theirs, ours, "twice", hf_inputs("opt"))
    combine_both(theirs, ours, ["one", "two"], [1.0, 1.0], "both", "cat")
    targets = compiled_info(ours).spec.adapters["both"].targets
    assert set(targets.names) == {"q_proj", "v_proj"}
    assert_same_adapter(theirs, ours, "both", hf_inputs("opt"))


def test_regex_targets_are_joined():
    data = adapters(
        {"targets": {"kind": "regex", "pattern": r".*\.q_proj"}, "r": 4},
        {"targets": {"kind": "regex", "pattern": r".*layers\.1.*\.v_proj"}, "r": 2},
    )
    theirs, ours = build(tiny_hf("opt").eval(), data)
    combine_both(theirs, ours, ["one", "two"], [0.5, 0.5], "mix", "svd")
    pattern = compiled_info(ours).spec.adapters["mix"].targets.pattern
    assert (
        pattern
        == theirs.peft_config["mix"].target_modules
        == r"(.*\.q_proj)|(.*layers\.1.*\.v_proj)"
    )
    assert_same_adapter(theirs, ours, "mix", hf_inputs("opt"))


# --- errors: the cases peft refuses, refused too -----------------------------------------

ERRORS = [
    (["one", "nope"], {}, "Adapter nope does not exist"),
    (
        ["one", "two"],
        {"combination_type": "linear"},
        r"needs adapters of one rank \('one': r=4, 'two': r=2\)",
    ),
    (["one", "two"], {"combination_type": "dare_ties"}, "needs adapters of one rank"),
    (["one", "two"], {"combination_type": "average"}, "Invalid combination_type: 'average'"),
]


@pytest.mark.parametrize(("names_", "kwargs", "message"), ERRORS)
def test_errors_match_peft(names_, kwargs, message):
    data = adapters(names("q_proj", r=4), names("v_proj", r=2))
    theirs, ours = build(tiny_hf("opt"), data)
    with pytest.raises(ValueError):
        theirs.add_weighted_adapter(names_, [1.0] * len(names_), "new", **kwargs)
    with pytest.raises(ValueError, match=message):
        combine_adapters(ours, names_, [1.0] * len(names_), "new", **kwargs)
    assert list(compiled_info(ours).spec.adapters) == ["one", "two"]


def test_modules_to_save_conflict_and_target_kinds_refused_as_in_peft():
    saving = adapters(
        names("q_proj", modules_to_save=["lm_head"]), names("v_proj", modules_to_save=["lm_head"])
    )
    theirs, ours = build(tiny_hf("opt"), saving)
    message = "target the same module with modules_to_save, but found 1 such instance"
    with pytest.raises(ValueError, match=message):
        theirs.add_weighted_adapter(["one", "two"], [1.0, 1.0], "new", "cat")
    with pytest.raises(ValueError, match=message):
        combine_adapters(ours, ["one", "two"], [1.0, 1.0], "new", "cat")
    mixed = adapters(names("q_proj"), {"targets": {"kind": "regex", "pattern": ".*v_proj"}})
    theirs, ours = build(tiny_hf("opt"), mixed)
    with pytest.raises(ValueError, match="same target modules type"):
        theirs.add_weighted_adapter(["one", "two"], [1.0, 1.0], "new", "cat")
    with pytest.raises(adaptc.CompileError, match="regex targets with name lists"):
        combine_adapters(ours, ["one", "two"], [1.0, 1.0], "new", "cat")


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((["one", "two"], [1.0], "new"), {}, "got 1 weights for 2 adapters"),
        ((["one", "two"], [1.0, 1.0], "one"), {}, "already has adapter 'one'"),
        ((["one", "two"], [1.0, 1.0], "new"), {"combination_type": "ties"}, "needs density"),
        ((["one", "two"], [1.0, 1.0], "new"), {"combination_type": "ties", "density": -1}, ">= 0"),
        (
            (["one", "two"], [1.0, 1.0], "new"),
            {"majority_sign_method": "max"},
            "'total' or 'frequency'",
        ),
        ((["one", "two"], [1.0, 1.0], "no spaces"), {}, "does not match"),
        (([], [], "new"), {}, "non-empty list"),
    ],
)
def test_arguments_peft_would_ignore_or_crash_on_are_refused(args, kwargs, message):
    ours = adaptc.compile(tiny_hf("opt"), adapters(names("q_proj"), names("v_proj")))
    with pytest.raises(ValueError, match=message):
        combine_adapters(ours, *args, **kwargs)


def test_failure_after_adding_leaves_nothing_behind():
    ours = adaptc.compile(tiny_hf("opt"), adapters(names("q_proj"), names("v_proj")))
    with pytest.raises(RuntimeError):  # svd_driver is for CUDA only: fails while filling
        combine_adapters(ours, ["one", "two"], [1.0, 1.0], "new", "svd", svd_driver="gesvd")
    assert list(compiled_info(ours).spec.adapters) == ["one", "two"]
    assert not any(b.adapter == "new" for b in branches(ours).values())


# --- the original, the sources and the files ------------------------------------------------


def test_original_and_sources_untouched_and_new_adapter_frozen():
    model = tiny_hf("opt").eval()
    before = snapshot(model)
    ours = adaptc.compile(model, adapters(names("q_proj", "fc1"), names("fc1", init="random")))
    sources = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    combine_adapters(ours, ["one", "two"], [0.5, 0.5], "mix", "ties", density=0.5)
    assert_same(before, snapshot(model))
    after = ours.state_dict()
    for key, value in sources.items():
        assert torch.equal(after[key], value), key
    new = [p for (_, a), b in branches(ours).items() if a == "mix" for p in b.parameters()]
    assert new and not any(p.requires_grad for p in new)


def test_combined_adapter_saves_loads_and_peft_reads_it(tmp_path):
    model = tiny_hf("opt").eval()
    data = adapters(
        names("q_proj", "v_proj", r=4), names("v_proj", "fc1", r=2), task_type="CAUSAL_LM"
    )
    ours = adaptc.compile(model, data)
    share_adapter_weights(build(model, data)[0], ours)
    combine_adapters(ours, ["one", "two"], [0.8, 0.4], "mix", "svd")
    adaptc.set_active(ours, "mix")
    adaptc.save_adapter(ours, tmp_path)
    back = adaptc.load_adapter(model, tmp_path).eval()
    adaptc.set_active(back, "mix")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mix").eval()
    assert theirs.peft_config["default"].r == 4 and theirs.peft_config["default"].lora_alpha == 4
    x = hf_inputs("opt")
    with torch.no_grad():
        expected = ours(**x).logits
        torch.testing.assert_close(back(**x).logits, expected, **TOL)
        torch.testing.assert_close(theirs(**x).logits, expected, **TOL)
