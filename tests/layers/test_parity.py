"""Every layer rule against the real ``peft`` package: outputs, gradients, ΔW, merges.

The table is (layer × variant). Both sides hold the same adapter tensors (PEFT's, made
random so that every term contributes), and must agree to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.layers._harness import (
    CASE,
    CASES,
    Case,
    ScaledEmbedding,
    adapt_both,
    adapter_params,
    ids,
    stack_second_adapter,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 6, "use_rslora": True},
    "lora_bias": {"r": 4, "lora_alpha": 8, "lora_bias": True},
    "dropout": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
    "dora-dropout": {"r": 4, "lora_alpha": 8, "use_dora": True, "lora_dropout": 0.3},
    "dora-rslora": {"r": 4, "lora_alpha": 3, "use_dora": True, "use_rslora": True},
}


def _applies(case: Case, variant: str) -> bool:
    embedding = case.name.startswith("embedding")
    if variant == "lora_bias":
        return case.bias and not embedding  # PEFT refuses lora_bias on embeddings
    return True


TABLE = [
    pytest.param(case, name, id=f"{case}-{name}")
    for case in CASES
    for name in VARIANTS
    if _applies(case, name)
]


def _opts(case: Case, variant: str) -> dict[str, Any]:
    return {**VARIANTS[variant], "r": case.r}


@pytest.mark.parametrize(("case", "variant"), TABLE)
def test_forward_and_gradients_match_peft(case: Case, variant: str) -> None:
    ours, model, module = adapt_both(case, **_opts(case, variant))
    x = case.input()
    ours.gm.eval()
    model.eval()
    torch.testing.assert_close(ours.gm(x), model(x), **EXACT)

    # training mode: the same dropout masks under the same seed, then the same gradients
    ours.gm.train()
    model.train()
    torch.manual_seed(123)
    out = ours.gm(x)
    torch.manual_seed(123)
    ref = model(x)
    torch.testing.assert_close(out, ref, **EXACT)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    theirs = adapter_params(module)
    for name, p in ours.branch.named_parameters():
        assert p.grad is not None and theirs[name].grad is not None, name
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("case", "variant"), TABLE)
def test_delta_and_merge_match_peft(case: Case, variant: str) -> None:
    ours, model, module = adapt_both(case, **_opts(case, variant))
    layer = ours.layer
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    if not case.mergeable:
        pytest.skip("PEFT cannot merge this layer (see test_unmergeable_layers)")
    with torch.no_grad():
        torch.testing.assert_close(
            ours.rule.delta_weight(layer, ours.branch),
            module.get_delta_weight("default"),
            rtol=1e-5,
            atol=1e-6,
        )
        merged = ours.rule.merge(layer, ours.branch, weight)
    ref = model.merge_and_unload().layer
    torch.testing.assert_close(merged.weight, ref.weight, rtol=1e-5, atol=1e-6)
    if merged.bias is not None or "lora_bias" in variant:
        torch.testing.assert_close(merged.bias, ref.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("case", "variant"), TABLE)
def test_merged_layer_computes_the_adapted_output(case: Case, variant: str) -> None:
    """The merge is consistent with the compiled forward (eval mode)."""
    ours, _, _ = adapt_both(case, **_opts(case, variant))
    if case.name == "conv2d-groups":
        pytest.skip("convolutions with groups > 1 cannot be merged")
    if not case.linear:
        pytest.skip("max_norm renormalises rows: the output is not linear in the weight")
    x = case.input()
    ours.gm.eval()
    expected = ours.gm(x)
    layer = ours.layer
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        merged = ours.rule.merge(layer, ours.branch, weight)
        plain = type(layer).__new__(type(layer))
        plain.__dict__ = {**layer.__dict__, "_modules": {}, "_parameters": dict(layer._parameters)}
        plain._parameters["weight"] = nn.Parameter(merged.weight)
        if merged.bias is not None:
            plain._parameters["bias"] = nn.Parameter(merged.bias)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_unmergeable_layers() -> None:
    """groups > 1: PEFT raises NotImplementedError, adaptc a ValueError naming the target."""
    ours, model, _ = adapt_both(CASE["conv2d-groups"], r=4)
    weight = ours.layer.weight
    assert isinstance(weight, torch.Tensor)
    with pytest.raises(ValueError, match="layer: cannot merge into a convolution with groups=2"):
        ours.rule.merge(ours.layer, ours.branch, weight)
    with pytest.raises(NotImplementedError):
        model.merge_and_unload()


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv3d_pointwise_delta_is_the_convolution_of_the_factors(use_dora: bool) -> None:
    """PEFT's 1×1 shortcut fails on Conv3d; adaptc's ΔW reproduces B(A(x)) exactly."""
    ours, _, module = adapt_both(CASE["conv3d-1x1x1"], r=4, use_dora=use_dora)
    with pytest.raises(RuntimeError):
        module.get_delta_weight("default")
    A, B = ours.branch.lora_A, ours.branch.lora_B
    x = torch.randn(2, 3, 2, 3, 3)
    delta = ours.rule.delta_weight(ours.layer, ours.branch)
    expected = B(A(x)) * ours.branch.scaling
    torch.testing.assert_close(nn.functional.conv3d(x, delta), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("buffer", [True, False])
@pytest.mark.parametrize("use_dora", [False, True])
def test_embed_scale_as_a_float_attribute(buffer: bool, use_dora: bool) -> None:
    """A float ``embed_scale`` scales the update as PEFT's ``_get_embed_scale`` does."""
    case = Case("scaled", lambda: ScaledEmbedding(12, 6, 1.7, buffer=buffer), ids(12, 3, 4))
    for dtype, tol in ((None, EXACT), (torch.bfloat16, {"rtol": 0, "atol": 0})):
        ours, model, _ = adapt_both(case, dtype=dtype, r=4, lora_alpha=8, use_dora=use_dora)
        x = case.input()
        ours.gm.eval()
        model.eval()
        out = ours.gm(x)
        torch.testing.assert_close(out, model(x), **tol)
        assert "embed_scale" in ours.gm.code or not buffer


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("name", ["linear", "conv1D", "embedding-pad", "conv2d-3x3", "conv1d"])
def test_two_stacked_adapters_match_peft(name: str, use_dora: bool) -> None:
    """The second branch gets the first one's output as ``base_out`` (PEFT's running
    ``result``), and merging them in turn takes each DoRA norm from the unmerged weight."""
    case = CASE[name]
    opts = {"r": 4, "lora_alpha": 8, "use_dora": use_dora}
    ours, model, module = adapt_both(case, **opts)
    second = stack_second_adapter(ours, model, module, **{**opts, "r": 2, "lora_alpha": 3})
    x = case.input()
    ours.gm.eval()
    model.eval()
    torch.testing.assert_close(ours.gm(x), model(x), **EXACT)

    layer, weight = ours.layer, ours.layer.weight
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        for branch in (ours.branch, second):
            weight = ours.rule.merge(layer, branch, weight).weight
    ref = model.merge_and_unload().layer
    torch.testing.assert_close(weight, ref.weight, rtol=1e-5, atol=1e-6)
