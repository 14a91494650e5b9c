"""LoRA on HQQ's ``HQQLinear`` (a tiny Llama through ``AutoHQQHFModel.quantize_model``:
2, 4 and 8 bits in groups of 64, float32 compute) against peft 0.21.2 (its
``HqqLoraLinear``) on the same quantized base: outputs, LoRA gradients, counts, files both
ways, the user's layers untouched and shared, and the dequantized merge."""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from torch import nn

import adaptc
import adaptc.peft as ap
from tests.layers._quantized import (
    Quantize,
    assert_files_both_ways,
    assert_merging_in_place_is_refused,
    assert_parity,
    assert_refused,
    expected_merge,
    layer_and_branch,
    logits,
    pair,
    quiet,
    spec,
    tiny_llama,
)

hqq = pytest.importorskip("hqq")
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear  # noqa: E402
from hqq.models.hf.base import AutoHQQHFModel  # noqa: E402


@functools.cache
def quantized(nbits: int, dtype: torch.dtype) -> nn.Module:
    """The tiny Llama quantized by HQQ once (its optimizer takes a second per model)."""

    def quantize(model: nn.Module) -> None:
        config = BaseQuantizeConfig(nbits=nbits, group_size=64)
        model.to(dtype)
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=dtype, device="cpu")

    return tiny_llama(quantize)


def hqq_bits(nbits: int, dtype: torch.dtype = torch.float32) -> Quantize:
    """Quantizes a fresh tiny Llama as :func:`quantized` did (copies of its layers)."""

    def quantize(model: nn.Module) -> None:
        model.to(dtype)
        for name, layer in quantized(nbits, dtype).named_modules():
            if isinstance(layer, HQQLinear):
                model.set_submodule(name, copy.deepcopy(layer))

    return quantize


@pytest.fixture(params=[2, 4, 8])
def nbits(request: pytest.FixtureRequest) -> int:
    return request.param  # type: ignore[no-any-return]


def test_the_layers_are_their_own_kind():
    layer = tiny_llama(hqq_bits(4)).model.layers[0].self_attn.q_proj
    assert type(layer) is HQQLinear
    assert adaptc.layers.kind_of(layer).name == "hqq.HQQLinear"


def test_outputs_gradients_counts_and_files_equal_peft(nbits, tmp_path):
    _, theirs, mine = pair(hqq_bits(nbits), tmp_path)
    assert (
        type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "HqqLoraLinear"
    )
    assert_parity(theirs, mine)
    assert_files_both_ways(hqq_bits(nbits), theirs, mine, tmp_path)


def test_bfloat16_casts_after_the_add_as_peft(tmp_path):
    """``HqqLoraLinear``: ``(base + s·B·A·x.float()).to(compute_dtype)``, one rounding; the
    bitsandbytes order (LoRA output to bfloat16, then the add) rounds twice."""
    _, theirs, mine = pair(hqq_bits(4, torch.bfloat16), tmp_path)
    ours, theirs_out = logits(mine), logits(theirs)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs_out)
    code = mine.get_base_model().model.layers[0].self_attn.q_proj.code
    assert code.index("add = ") < code.index(".to(torch.bfloat16)")


def test_the_users_layers_are_untouched_and_shared():
    base = tiny_llama(hqq_bits(4))
    layer = base.model.layers[0].self_attn.q_proj
    w_q, meta, before = layer.W_q, layer.meta, dict(layer.meta)
    codes, scale = w_q.clone(), meta["scale"].clone()
    model = adaptc.compile(base, spec())
    logits(model)
    assert layer.W_q is w_q and layer.meta is meta and layer.meta == before
    assert torch.equal(w_q, codes) and torch.equal(meta["scale"], scale)
    ours = model.model.layers[0].self_attn.q_proj.base_layer
    assert ours.W_q is not w_q and ours.W_q.data_ptr() == w_q.data_ptr()  # shared codes
    assert ours.meta is not meta and ours.meta["scale"] is meta["scale"]  # its own dict


def test_merge_dequantizes(tmp_path):
    _, _, mine = pair(hqq_bits(4), tmp_path)
    before = logits(mine)
    layer, branch = layer_and_branch(mine)
    expected = expected_merge(layer.dequantize(), branch)
    merged = mine.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(q_proj.weight, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(merged), before, rtol=1e-5, atol=1e-5)


def test_merging_in_place_is_refused_and_changes_nothing(tmp_path):
    assert_merging_in_place_is_refused(pair(hqq_bits(4), tmp_path)[2])


def test_base_inits_lora_bias_and_dora_are_refused():
    assert_refused(lambda: tiny_llama(hqq_bits(4)), [
        ({"init": "mica"}, "init 'mica' is not available on hqq.HQQLinear"),
        ({"lora_bias": True}, "lora_bias is not available on hqq.HQQLinear"),
        ({"use_dora": True}, "not available for hqq.HQQLinear"),
    ])  # fmt: skip


def test_all_linear_selects_what_peft_selects():
    """PEFT's all-linear takes nn.Linear and Conv1D only: not HQQ's layers (all the
    decoder's linear layers here), so neither library finds a target."""
    for lib in (peft, ap):
        with quiet(), pytest.raises(ValueError, match=r"(?i)target"):
            lib.get_peft_model(tiny_llama(hqq_bits(4)), lib.LoraConfig(target_modules="all-linear"))


def test_a_requantizing_merge_gives_hqq_layers_and_reports_the_error():
    model = adaptc.compile(tiny_llama(hqq_bits(4)), spec(init="random"))
    errors: dict[str, float] = {}
    with pytest.warns(adaptc.AdaptcWarning, match="requantized 2 merged layer"):
        merged = adaptc.merge(model, quantized="requantize", errors=errors)
    layer = merged.model.layers[0].self_attn.q_proj
    assert (
        type(layer).__name__ == "HQQLinear"
        and layer.quant_config["weight_quant_params"]["nbits"] == 4
    )
    assert len(errors) == 2 and 0 < max(errors.values()) < 0.1  # q_proj in 2 layers
    torch.testing.assert_close(logits(merged), logits(model), rtol=0.05, atol=0.05)
