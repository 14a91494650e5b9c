"""LoRA on torchao-quantized linear layers (a tiny Llama through ``quantize_``: int8
weight-only, int4 in groups of 32, and NF4 weights put in by hand) against peft 0.21.2 on
the same quantized base: outputs, LoRA gradients, counts, files both ways, the user's
layers untouched and shared, and the dequantized merge."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import adaptc
import adaptc.peft as ap
from tests.layers._quantized import (
    assert_files_both_ways,
    assert_parity,
    assert_refused,
    expected_merge,
    inner,
    layer_and_branch,
    logits,
    pair,
    quiet,
    spec,
    tiny_llama,
)

torchao = pytest.importorskip("torchao")
from torchao.quantization import (  # noqa: E402
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
    to_nf4,
)
from torchao.quantization.granularity import PerGroup  # noqa: E402


def int8(model: nn.Module) -> None:
    quantize_(model, Int8WeightOnlyConfig())


def int4(model: nn.Module) -> None:
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def nf4(model: nn.Module) -> None:
    """QLoRA's NF4 weights (blocks of 32, scalers in blocks of 8) on the decoder's layers."""
    for layer in model.model.layers:
        for linear in layer.modules():
            if type(linear) is nn.Linear:
                linear.weight = nn.Parameter(to_nf4(linear.weight.detach(), 32, 8), False)


SCHEMES = {"int8": int8, "int4": int4, "nf4": nf4}


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    if type(weight).__name__ == "NF4Tensor":
        return weight.get_original_weight()  # type: ignore[attr-defined,no-any-return]
    return weight.dequantize()


@pytest.fixture(params=list(SCHEMES))
def scheme(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def test_the_layers_are_their_own_kind(scheme):
    layer = tiny_llama(SCHEMES[scheme]).model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear
    assert adaptc.layers.kind_of(layer).name == "torchao.Linear"


def test_outputs_gradients_counts_and_files_equal_peft(scheme, tmp_path):
    _, theirs, mine = pair(SCHEMES[scheme], tmp_path)
    wrapper = "TorchaoLoraLinear" if scheme != "nf4" else "Linear"
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == wrapper
    assert_parity(theirs, mine)
    assert_files_both_ways(SCHEMES[scheme], theirs, mine, tmp_path)


def test_bfloat16_equals_peft(scheme, tmp_path):
    """PEFT's ``lora.Linear`` order: ``(base + s·B·A·x.float()).to(bfloat16)``."""

    def quantize(model: nn.Module) -> None:
        SCHEMES[scheme](model.to(torch.bfloat16))

    _, theirs, mine = pair(quantize, tmp_path)
    ours = logits(mine)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, logits(theirs))


def test_the_users_layers_are_untouched_and_shared(scheme):
    base = tiny_llama(SCHEMES[scheme])
    layer = base.model.layers[0].self_attn.q_proj
    weight, before = layer.weight, [t.clone() for t in inner(layer.weight)]
    model = adaptc.compile(base, spec())
    logits(model)
    assert layer.weight is weight and not weight.requires_grad
    assert all(torch.equal(t, b) for t, b in zip(inner(weight), before, strict=True))
    ours = model.model.layers[0].self_attn.q_proj.base_layer
    assert type(ours.weight) is type(weight) and ours.weight is not weight
    assert [t.data_ptr() for t in inner(ours.weight)] == [t.data_ptr() for t in inner(weight)]


def test_merge_dequantizes(scheme, tmp_path):
    _, _, mine = pair(SCHEMES[scheme], tmp_path)
    before = logits(mine)
    layer, branch = layer_and_branch(mine)
    expected = expected_merge(dequantized(layer.weight), branch)
    merged = mine.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and type(q_proj.weight) is nn.Parameter
    torch.testing.assert_close(q_proj.weight, expected, rtol=1e-6, atol=1e-6)
    # the merged model computes with the dequantized weights: close to the quantized one
    torch.testing.assert_close(logits(merged), before, rtol=0.05, atol=0.05)


def test_base_inits_lora_bias_and_dora_are_refused():
    assert_refused(lambda: tiny_llama(int8), [
        ({"init": "pissa"}, "init 'pissa' is not available on torchao.Linear"),
        ({"lora_bias": True}, "lora_bias is not available on torchao.Linear"),
        ({"use_dora": True}, "not available for torchao.Linear"),
    ])  # fmt: skip


def test_nf4_takes_lora_bias_as_peft_does():  # peft's plain lora.Linear
    with quiet():  # "lora_bias on a layer that has no bias"
        model = adaptc.compile(tiny_llama(nf4), spec(lora_bias=True))
    assert model.model.layers[0].self_attn.q_proj.lora_default.lora_B.bias is not None


def test_all_linear_selects_what_peft_selects():
    names = []
    for lib in (peft, ap):
        with quiet():
            model = lib.get_peft_model(
                tiny_llama(int8), lib.LoraConfig(target_modules="all-linear")
            )
        names.append(sorted(model.targeted_module_names))
    assert names[1] == names[0] and len(names[0]) == 14  # 7 per layer, not lm_head


def test_merging_in_place_holds_the_dequantized_weight_until_unmerged(tmp_path):
    """The layer stays an ``nn.Linear``: ``merge_adapter`` swaps in a float weight
    ``W_deq + s·ΔW`` (the user's Int8Tensor is kept for the unmerge, which is exact)."""
    base, _, mine = pair(int8, tmp_path)
    before = logits(mine)
    mine.merge_adapter()
    layer = mine.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer.weight) is nn.Parameter
    torch.testing.assert_close(logits(mine), before, rtol=1e-5, atol=1e-5)
    mine.unmerge_adapter()
    assert torch.equal(logits(mine), before)
    assert type(layer.weight).__name__ == "Int8Tensor"
    assert type(base.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"


def test_a_requantizing_merge_keeps_each_format_and_reports_the_error(scheme):
    model = adaptc.compile(tiny_llama(SCHEMES[scheme]), spec(init="random"))
    original = type(tiny_llama(SCHEMES[scheme]).model.layers[0].self_attn.q_proj.weight)
    errors: dict[str, float] = {}
    with pytest.warns(adaptc.AdaptcWarning, match="requantized 2 merged layer"):
        merged = adaptc.merge(model, quantized="requantize", errors=errors)
    assert type(merged.model.layers[0].self_attn.q_proj.weight) is original
    assert len(errors) == 2 and 0 < max(errors.values()) < 0.1  # q_proj in 2 layers
    torch.testing.assert_close(logits(merged), logits(model), rtol=0.05, atol=0.05)
