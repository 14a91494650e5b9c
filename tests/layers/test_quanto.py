"""LoRA on optimum-quanto's ``QLinear`` (a tiny Llama through ``quantize`` + ``freeze``:
qint8 and qint4 weights) against peft 0.21.2 (its plain ``lora.Linear``) on the same
quantized base: outputs, LoRA gradients, counts, files both ways, the user's layers
untouched and shared, and the merge into a float ``nn.Linear``."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import adaptc
import adaptc.peft as ap
from tests.layers._quantized import (
    assert_files_both_ways,
    assert_merging_in_place_is_refused,
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

quanto = pytest.importorskip("optimum.quanto")


def frozen(qtype: object) -> object:
    def quantize(model: nn.Module) -> None:
        quanto.quantize(model, weights=qtype)
        quanto.freeze(model)

    return quantize


SCHEMES = {"qint8": frozen(quanto.qint8), "qint4": frozen(quanto.qint4)}


@pytest.fixture(params=list(SCHEMES))
def scheme(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def test_the_layers_are_their_own_kind(scheme):
    layer = tiny_llama(SCHEMES[scheme]).model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "QLinear"
    assert adaptc.layers.kind_of(layer).name == "quanto.QLinear"


def test_outputs_gradients_counts_and_files_equal_peft(scheme, tmp_path):
    _, theirs, mine = pair(SCHEMES[scheme], tmp_path)
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj) is peft.tuners.lora.Linear
    assert_parity(theirs, mine)
    assert_files_both_ways(SCHEMES[scheme], theirs, mine, tmp_path)


def test_the_users_layers_are_untouched_and_shared(scheme):
    base = tiny_llama(SCHEMES[scheme])
    layer = base.model.layers[0].self_attn.q_proj
    weight, before = layer.weight, [t.clone() for t in inner(layer.weight)]
    model = adaptc.compile(base, spec())
    logits(model)
    assert layer.weight is weight and weight.requires_grad  # as quanto left it
    assert all(torch.equal(t, b) for t, b in zip(inner(weight), before, strict=True))
    ours = model.model.layers[0].self_attn.q_proj.base_layer
    assert type(ours.weight) is type(weight) and not ours.weight.requires_grad
    assert [t.data_ptr() for t in inner(ours.weight)] == [t.data_ptr() for t in inner(weight)]


def test_merge_gives_a_float_linear(scheme, tmp_path):
    """Not a QLinear holding the merged float weight: it would quantize it again on every
    forward, rounding the update away."""
    _, _, mine = pair(SCHEMES[scheme], tmp_path)
    before = logits(mine)
    layer, branch = layer_and_branch(mine)
    expected = expected_merge(layer.weight.dequantize(), branch)
    merged = mine.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and type(q_proj.weight) is nn.Parameter
    torch.testing.assert_close(q_proj.weight, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q_proj(torch.eye(64)).T, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(merged), before, rtol=0.05, atol=0.05)


def test_merging_in_place_is_refused_and_changes_nothing(tmp_path):
    assert_merging_in_place_is_refused(pair(SCHEMES["qint8"], tmp_path)[2])


def test_base_inits_and_dora_are_refused():
    assert_refused(lambda: tiny_llama(SCHEMES["qint8"]), [
        ({"init": "olora"}, "init 'olora' is not available on quanto.QLinear"),
        ({"use_dora": True}, "not available for quanto.QLinear"),
    ])  # fmt: skip


def test_all_linear_selects_what_peft_selects():
    names = []
    for lib in (peft, ap):
        with quiet():
            config = lib.LoraConfig(target_modules="all-linear")
            model = lib.get_peft_model(tiny_llama(SCHEMES["qint4"]), config)
        names.append(sorted(model.targeted_module_names))
    assert names[1] == names[0] and len(names[0]) == 14  # 7 per layer, not lm_head


def test_a_requantizing_merge_gives_frozen_qlinears_and_reports_the_error():
    model = adaptc.compile(tiny_llama(SCHEMES["qint4"]), spec(init="random"))
    errors: dict[str, float] = {}
    with pytest.warns(adaptc.AdaptcWarning, match="requantized 2 merged layer"):
        merged = adaptc.merge(model, quantized="requantize", errors=errors)
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "QLinear" and type(layer.weight).__name__ == "WeightQBitsTensor"
    assert len(errors) == 2 and 0 < max(errors.values()) < 0.1  # q_proj in 2 layers
    torch.testing.assert_close(logits(merged), logits(model), rtol=0.05, atol=0.05)
