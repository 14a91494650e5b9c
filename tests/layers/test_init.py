"""Initialisation, refusals, purity, meta device and half precision of the layer rules."""

from __future__ import annotations

import math
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.dora import (
    DoraConv1dLayer,
    DoraConv2dLayer,
    DoraEmbeddingLayer,
    DoraLinearLayer,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaptc.methods.lora.method import rule_for
from tests.layers._harness import (
    CASE,
    CASES,
    adapt_both,
    branch_config,
    compile_layer,
    peft_layer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

NAMES = ["linear", "conv1D", "embedding", "embedding-pad", "conv1d", "conv2d-3x3", "conv3d"]


def _factors(branch: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a branch in its own layout."""
    if hasattr(branch, "lora_embedding_A"):
        return branch.lora_embedding_A, branch.lora_embedding_B
    return branch.lora_A.weight, branch.lora_B.weight


# --- initialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.Linear(300, 40), lambda: nn.Conv2d(30, 40, 3)])
def test_default_init_is_kaiming_A_and_zero_B(make: Any) -> None:
    layer = make()
    ours = compile_layer(layer, r=8, lora_alpha=16)
    _, module = peft_layer(layer, r=8, lora_alpha=16)
    A, B = _factors(ours.branch)
    bound = 1 / math.sqrt(A[0].numel())  # kaiming_uniform(a=√5): 1/√fan_in
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert module.lora_A["default"].weight.abs().max() <= bound
    assert torch.count_nonzero(B) == 0
    assert A.shape == module.lora_A["default"].weight.shape
    assert B.shape == module.lora_B["default"].weight.shape


@pytest.mark.parametrize("make", [lambda: nn.Linear(300, 40), lambda: nn.Conv1d(100, 40, 3)])
def test_gaussian_init_has_std_one_over_r(make: Any) -> None:
    ours = compile_layer(make(), r=8, init_lora_weights="gaussian")
    A, B = _factors(ours.branch)
    assert A.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert torch.count_nonzero(B) == 0


@pytest.mark.parametrize("init", [True, "gaussian", "pissa", "olora"])
def test_embedding_init_is_zero_A_normal_B_as_in_peft(init: Any) -> None:
    """PEFT has no gaussian/PiSSA/OLoRA branch for embeddings: all give A = 0, B ~ N(0, 1)."""
    layer = nn.Embedding(400, 64)
    ours = compile_layer(layer, r=8, init_lora_weights=init)
    _, module = peft_layer(layer, r=8, init_lora_weights=init)
    A, B = _factors(ours.branch)
    assert (
        torch.count_nonzero(A) == 0 and torch.count_nonzero(module.lora_embedding_A["default"]) == 0
    )
    assert B.std().item() == pytest.approx(1.0, rel=0.15)
    assert ours.replaced == {}
    torch.testing.assert_close(ours.layer.weight, layer.weight, rtol=0, atol=0)
    warnings = ours.rule.check(layer, branch_config(layer, r=8, init_lora_weights=init))
    assert bool(warnings) == (init is not True)


@pytest.mark.parametrize("name", ["linear", "embedding", "conv2d-3x3"])
def test_random_init_makes_both_factors_non_zero(name: str) -> None:
    ours = compile_layer(CASE[name].layer(), r=4, init_lora_weights=False)
    A, B = _factors(ours.branch)
    assert torch.count_nonzero(A) == A.numel() and torch.count_nonzero(B) == B.numel()
    if name == "embedding":  # PEFT keeps torch.randn for both
        assert A.std().item() == pytest.approx(1.0, rel=0.5)


INITS = [("linear", "pissa"), ("linear", "olora"), ("conv1D", "pissa")]
LAYERS = {"linear": lambda: nn.Linear(10, 7), "conv1D": lambda: Conv1D(7, 10)}


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize(("kind", "init"), INITS)
def test_pissa_and_olora_factors_and_residual_match_peft(
    kind: str, init: str, use_dora: bool
) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    opts = {"r": 3, "lora_alpha": 6, "init_lora_weights": init, "use_dora": use_dora}
    ours = compile_layer(layer, **opts)
    _, module = peft_layer(layer, **opts)
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ours.branch.lora_A.weight, module.lora_A["default"].weight, **close)
    torch.testing.assert_close(ours.branch.lora_B.weight, module.lora_B["default"].weight, **close)
    torch.testing.assert_close(ours.layer.weight, module.base_layer.weight, **close)
    if use_dora:
        torch.testing.assert_close(
            ours.branch.lora_magnitude_vector,
            module.lora_magnitude_vector["default"].weight,
            **close,
        )


@pytest.mark.parametrize("use_dora", [False, True])
def test_olora_on_conv1D_is_transposed(use_dora: bool) -> None:
    """PEFT's OLoRA ignores fan_in_fan_out (its lora_A comes out (r, out), and DoRA's init
    fails); adaptc factors Wᵀ, so the adapted layer starts out as the base layer."""
    torch.manual_seed(0)
    layer = Conv1D(7, 10)
    opts = {"r": 3, "lora_alpha": 6, "init_lora_weights": "olora", "use_dora": use_dora}
    ours = compile_layer(layer, **opts)
    A, B = _factors(ours.branch)
    assert A.shape == (3, 10) and B.shape == (7, 3)
    rebuilt = ours.layer.weight + ours.branch.scaling * (B @ A).T
    torch.testing.assert_close(rebuilt, layer.weight, rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours.gm(x), layer(x), rtol=1e-5, atol=1e-5)
    if use_dora:
        with pytest.raises(RuntimeError):
            peft_layer(layer, **opts)
    else:
        assert peft_layer(layer, **opts)[1].lora_A["default"].weight.shape == (3, 7)


def test_pissa_niter_reconstructs_the_base_weight() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    ours = compile_layer(layer, r=4, lora_alpha=8, init_lora_weights="pissa_niter_4")
    A, B = _factors(ours.branch)
    rebuilt = ours.layer.weight + ours.branch.scaling * B @ A
    torch.testing.assert_close(rebuilt, layer.weight, rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(B @ A) == 4


@pytest.mark.parametrize("name", ["linear", "conv1D", "embedding", "conv2d-3x3", "conv1d"])
def test_dora_magnitude_is_peft_weight_norm(name: str) -> None:
    """With non-zero B·A (random init), ``m`` is what PEFT's DoRA layer computes from them."""
    torch.manual_seed(0)
    layer = CASE[name].layer()
    ours = compile_layer(layer, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    A, B = _factors(ours.branch)
    reference: nn.Module
    if isinstance(layer, nn.Embedding):
        reference = DoraEmbeddingLayer(fan_in_fan_out=True)
    elif isinstance(layer, nn.Conv2d):
        reference = DoraConv2dLayer(fan_in_fan_out=False)
    elif isinstance(layer, nn.Conv1d):
        reference = DoraConv1dLayer(fan_in_fan_out=False)
    else:
        reference = DoraLinearLayer(fan_in_fan_out=isinstance(layer, Conv1D))
    reference.update_layer(base_layer=layer, lora_A=A, lora_B=B, scaling=ours.branch.scaling)
    torch.testing.assert_close(ours.branch.lora_magnitude_vector, reference.weight)


# --- refusals and warnings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "opts", "match"),
    [
        (nn.Conv2d(4, 6, 3), {"init_lora_weights": "pissa"}, "init 'pissa' is not supported"),
        (nn.Conv1d(4, 6, 3), {"init_lora_weights": "olora"}, "init 'olora' is not supported"),
        (nn.Conv2d(4, 6, 3, groups=2), {"r": 3}, "not divisible by the Conv2d's groups=2"),
        (nn.Embedding(10, 4), {"lora_bias": True}, "lora_bias is not supported for nn.Embedding"),
    ],
)
def test_what_peft_refuses_adaptc_refuses(
    layer: nn.Module, opts: dict[str, Any], match: str
) -> None:
    opts = {"r": 2, **opts}
    rule = rule_for(layer)
    assert rule is not None
    cfg = branch_config(layer, **opts)
    with pytest.raises(ValueError, match=match):
        rule.check(layer, cfg)
    with pytest.raises(ValueError, match=match):
        rule.make_branch(layer, cfg)
    with pytest.raises(ValueError):
        peft_layer(layer, **opts)


def test_dilated_convolution_is_refused() -> None:
    """PEFT builds lora_A without dilation, so its branch does not fit the layer."""
    layer = nn.Conv2d(4, 6, 3, dilation=2, padding=2)
    with pytest.raises(ValueError, match=r"dilated \(dilation=\(2, 2\)\)"):
        compile_layer(layer, r=2)
    model, _ = peft_layer(layer, r=2)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 4, 8, 8))
    compile_layer(nn.Conv2d(4, 6, (1, 3), dilation=(2, 1)), r=2)  # no dilated kernel dimension


def test_dora_with_lora_bias_is_refused() -> None:
    layer = nn.Linear(4, 3)
    rule = rule_for(layer)
    assert rule is not None
    with pytest.raises(ValueError, match="lora_bias cannot be combined with DoRA"):
        rule.make_branch(layer, branch_config(layer, r=2, use_dora=True, lora_bias=True))


@pytest.mark.parametrize(
    ("layer", "opts", "match"),
    [
        (nn.Conv2d(4, 6, 3, groups=2), {}, "cannot be merged"),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), {}, "pads with zeros"),
        (nn.Conv2d(4, 6, 3, bias=False), {"lora_bias": True}, "without bias cannot be merged"),
        (nn.Embedding(10, 4), {"lora_dropout": 0.1}, "lora_dropout is not applied"),
    ],
)
def test_check_warns(layer: nn.Module, opts: dict[str, Any], match: str) -> None:
    rule = rule_for(layer)
    assert rule is not None
    warnings = rule.check(layer, branch_config(layer, r=2, **opts))
    assert any(match in w for w in warnings), warnings


def test_registry_names_the_spec_types() -> None:
    for layer, name in [
        (nn.Embedding(3, 2), "nn.Embedding"),
        (nn.Conv1d(2, 2, 1), "nn.Conv1d"),
        (nn.Conv2d(2, 2, 1), "nn.Conv2d"),
        (nn.Conv3d(2, 2, 1), "nn.Conv3d"),
        (nn.ConvTranspose2d(2, 2, 1), None),
    ]:
        rule = rule_for(layer)
        assert (rule.name if rule else None) == name


# --- purity, meta device, half precision ------------------------------------------------

PURITY = [
    {"r": 2},
    {"r": 2, "use_dora": True},
    {"r": 2, "init_lora_weights": "pissa"},
    {"r": 2, "init_lora_weights": "olora", "use_dora": True},
]


@pytest.mark.parametrize("opts", PURITY, ids=["plain", "dora", "pissa", "olora-dora"])
@pytest.mark.parametrize("name", NAMES)
def test_make_branch_never_touches_the_base_layer(name: str, opts: dict[str, Any]) -> None:
    layer = CASE[name].layer()
    if "init_lora_weights" in opts and not isinstance(layer, (nn.Linear, Conv1D)):
        opts = {k: v for k, v in opts.items() if k != "init_lora_weights"}
    rule = rule_for(layer)
    assert rule is not None
    before = {k: (p, p.detach().clone()) for k, p in layer.named_parameters()}
    branch, replaced = rule.make_branch(layer, branch_config(layer, **opts))
    after = dict(layer.named_parameters())
    assert after.keys() == before.keys() and list(layer.children()) == []
    for k, (p, value) in before.items():
        assert after[k] is p
        torch.testing.assert_close(p, value, rtol=0, atol=0)
    base_storage = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    for t in [*branch.parameters(), *replaced.values()]:
        assert t.untyped_storage().data_ptr() not in base_storage


@pytest.mark.parametrize("opts", PURITY[:2], ids=["plain", "dora"])
@pytest.mark.parametrize("name", NAMES)
def test_meta_base_gives_a_meta_branch(name: str, opts: dict[str, Any]) -> None:
    layer = CASE[name].layer()
    rule = rule_for(layer)
    assert rule is not None
    real, _ = rule.make_branch(layer, branch_config(layer, **opts))
    meta, replaced = rule.make_branch(layer.to("meta"), branch_config(layer, **opts))
    assert replaced == {}
    shapes = {k: (p.shape, p.dtype) for k, p in real.named_parameters()}
    assert {k: (p.shape, p.dtype) for k, p in meta.named_parameters()} == shapes
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_meta_pissa_skips_the_svd() -> None:
    layer = nn.Linear(6, 4, device="meta")
    rule = rule_for(layer)
    assert rule is not None
    branch, replaced = rule.make_branch(layer, branch_config(layer, r=2, init_lora_weights="pissa"))
    assert replaced == {} and all(p.is_meta for p in branch.parameters())


HALF = [c.name for c in CASES if c.name not in ("embedding-maxnorm", "conv3d-1x1x1")]


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("name", HALF)
def test_bfloat16_base_gets_float32_adapter_and_bfloat16_output(name: str, use_dora: bool) -> None:
    case = CASE[name]
    ours, model, _ = adapt_both(case, dtype=torch.bfloat16, r=4, use_dora=use_dora)
    assert all(p.dtype == torch.float32 for p in ours.branch.parameters())
    x = case.input()
    if x.is_floating_point():
        x = x.to(torch.bfloat16)
    ours.gm.eval()
    model.eval()
    out = ours.gm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # the same ops, bit for bit


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("name", [c.name for c in CASES if c.mergeable])
def test_bfloat16_merge_matches_peft_safe_merge(name: str, use_dora: bool) -> None:
    """Merges round ΔW to bf16 before adding it, as PEFT's ``safe_merge`` does (its default
    merge adds the float32 ΔW in place: one rounding fewer, up to 1 ulp apart)."""
    ours, model, _ = adapt_both(CASE[name], dtype=torch.bfloat16, r=4, use_dora=use_dora)
    weight = ours.layer.weight
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        merged = ours.rule.merge(ours.layer, ours.branch, weight)
    ref = model.merge_and_unload(safe_merge=True).layer
    assert merged.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged.weight, ref.weight, rtol=0, atol=0)


def test_bfloat16_conv_dora_trains_with_dropout() -> None:
    """PEFT's DoRA conv fails here (float32 input, bfloat16 weight); adaptc casts."""
    case = CASE["conv2d-3x3"]
    opts: dict[str, Any] = {"r": 4, "use_dora": True, "lora_dropout": 0.2}
    ours, model, _ = adapt_both(case, dtype=torch.bfloat16, **opts)
    x = case.input().to(torch.bfloat16)
    ours.gm.train()
    model.train()
    out = ours.gm(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and ours.branch.lora_magnitude_vector.grad is not None
    with pytest.raises(RuntimeError):
        model(x)


def test_peft_adapter_file_keys_are_the_branch_keys() -> None:
    """The keys PEFT writes to adapter files, minus the layer prefix, name our parameters."""
    for name, opts in [
        ("linear", {"use_dora": True}),
        ("embedding", {"use_dora": True}),
        ("conv2d-3x3", {"lora_bias": True}),
    ]:
        ours, model, _ = adapt_both(CASE[name], r=2, **opts)
        keys = {
            k.removeprefix("base_model.model.layer.") for k in peft.get_peft_model_state_dict(model)
        }
        assert keys == set(ours.branch.state_dict())
