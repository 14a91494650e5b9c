"""``adaptc.merge_in_place`` / ``unmerge_in_place``: merged weights in the compiled model
itself, no branch in its graphs, and the exact original weights back on unmerging."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaptc
from adaptc.adapters.keys import adapter_state_dict
from tests.compiler.models import NestedMLP
from tests.compiler.test_untouched import assert_same, snapshot


class Mixed(nn.Module):
    """A linear, a convolution and an embedding: every kind LoRA merges."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)
        return self.fc(torch.relu(self.conv(h)).transpose(1, 2))


def spec(**extra) -> dict:
    one = {"targets": {"kind": "names", "names": ["emb", "conv", "fc"]}, "init": "random"}
    return {"version": 1, "adapters": {"a": {**one, **extra}, "b": {**one, "r": 2}}}


@pytest.fixture
def pair():
    torch.manual_seed(0)
    model = Mixed().eval()
    return model, adaptc.compile(model, spec()).eval()


ALL = {"targets": {"kind": "all-linear"}}
# CPU convolutions here differ by ~3e-8 from one call to the next (the same model, the same
# input), so outputs are compared within CLOSE; exactness is asserted on the weights
CLOSE = {"rtol": 1e-6, "atol": 1e-7}
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def test_merged_outputs_equal_the_merged_model_and_unmerge_is_exact(pair):
    _, new = pair
    before = new(IDS)
    weights = {k: v for k, v in new.state_dict(keep_vars=True).items()}
    merged_copy = adaptc.merge(new)
    assert adaptc.merge_in_place(new) == ("a",)
    assert adaptc.merged_adapters(new) == ("a",)
    assert "lora" not in new.code  # the graph runs the base layers alone
    torch.testing.assert_close(new(IDS), merged_copy(IDS), **CLOSE)
    torch.testing.assert_close(new(IDS), before, rtol=1e-5, atol=1e-6)
    assert adaptc.unmerge_in_place(new) == ("a",)
    assert adaptc.merged_adapters(new) == ()
    torch.testing.assert_close(new(IDS), before, **CLOSE)
    after = new.state_dict(keep_vars=True)
    assert all(after[k] is v for k, v in weights.items())  # the very same tensors are back


def test_the_original_is_never_written(pair):
    model, new = pair
    before = snapshot(model)
    adaptc.merge_in_place(new)
    assert_same(before, snapshot(model))
    adaptc.unmerge_in_place(new)
    assert_same(before, snapshot(model))


def test_merge_and_disabled_read_the_original_weights_while_merged(pair):
    model, new = pair
    expected = adaptc.merge(new)(IDS)
    adaptc.merge_in_place(new)
    torch.testing.assert_close(adaptc.merge(new)(IDS), expected, **CLOSE)  # not merged twice
    with adaptc.disabled(new):
        torch.testing.assert_close(new(IDS), model(IDS), **CLOSE)
    torch.testing.assert_close(new(IDS), expected, **CLOSE)  # merged again after
    assert adaptc.merged_adapters(new) == ("a",)


def test_the_adapter_file_is_the_same_while_merged(pair):
    _, new = pair
    before = adapter_state_dict(new, "a")
    adaptc.merge_in_place(new)
    after = adapter_state_dict(new, "a")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_several_merges_add_up_and_a_merged_layer_runs_alone(pair):
    _, new = pair
    both = adaptc.merge(new, adapters=["a", "b"])(IDS)
    adaptc.merge_in_place(new, ["a"])
    with pytest.warns(adaptc.AdaptcWarning, match="Already following adapters were merged a"):
        adaptc.merge_in_place(new, ["a", "b"])
    torch.testing.assert_close(new(IDS), both, rtol=1e-5, atol=1e-6)
    with pytest.warns(adaptc.AdaptcWarning, match="nothing to do"):
        assert adaptc.merge_in_place(new, ["b"]) == ()


def test_operations_that_need_the_unmerged_model(pair):
    _, new = pair
    adaptc.merge_in_place(new)
    with pytest.raises(adaptc.CompileError, match="while they are merged"):
        adaptc.delete_adapter(new, "a")
    with pytest.raises(adaptc.MixedBatchError, match="unmerge them first"), \
            adaptc.mixed_batch(new, ["a", "b"]):  # fmt: skip
        pass
    with pytest.warns(adaptc.AdaptcWarning, match="Unmerging the model first"):
        adaptc.set_active(new, "b")
    assert adaptc.merged_adapters(new) == ()


def test_safe_merge_leaves_the_model_as_it_was_on_a_broken_adapter(pair):
    _, new = pair
    before = new(IDS)
    with torch.no_grad():
        new.fc.lora_a.lora_B.weight.fill_(float("nan"))
    broken = new(IDS)
    with pytest.raises(adaptc.MergeError, match="non-finite"):
        adaptc.merge_in_place(new, safe=True)
    assert adaptc.merged_adapters(new) == ()
    torch.testing.assert_close(new(IDS), broken, equal_nan=True)
    assert not torch.equal(before, broken)


def test_bfloat16_unmerge_is_exact():
    torch.manual_seed(0)
    model = NestedMLP().to(torch.bfloat16)
    new = adaptc.compile(model, {"version": 1, "adapters": {"a": {"init": "random", **ALL}}})
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    before = new(x)
    for _ in range(5):  # PEFT's subtract-to-unmerge drifts a little each round
        adaptc.merge_in_place(new)
        adaptc.unmerge_in_place(new)
    torch.testing.assert_close(new(x), before, rtol=0, atol=0)


def test_dora_merges_in_place_as_adaptc_merge():
    torch.manual_seed(0)
    model = NestedMLP().eval()
    adapter = {"init": "random", "use_dora": True, **ALL}
    new = adaptc.compile(model, {"version": 1, "adapters": {"a": adapter}})
    x = torch.randn(3, 12)
    expected = adaptc.merge(new)(x)
    adaptc.merge_in_place(new)
    torch.testing.assert_close(new(x), expected, rtol=0, atol=0)


def test_a_deep_copy_keeps_its_merge_state(pair):
    _, new = pair
    before = new(IDS)
    adaptc.merge_in_place(new)
    twin = copy.deepcopy(new)
    assert adaptc.merged_adapters(twin) == ("a",)
    adaptc.unmerge_in_place(twin)
    torch.testing.assert_close(twin(IDS), before, **CLOSE)
    assert adaptc.merged_adapters(new) == ("a",)  # the original copy stays merged


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_attention_merges_in_place_with_its_out_proj():
    torch.manual_seed(0)
    model = Attention().eval()
    adapter = {"targets": {"kind": "names", "names": ["attn"]}, "init": "random"}
    new = adaptc.compile(model, {"version": 1, "adapters": {"a": adapter}}).eval()
    x = torch.randn(2, 5, 8)
    before, expected = new(x), adaptc.merge(new)(x)
    adaptc.merge_in_place(new)
    torch.testing.assert_close(new(x), expected, **CLOSE)
    adaptc.unmerge_in_place(new)
    torch.testing.assert_close(new(x), before, **CLOSE)
