"""Adding and deleting adapters on a compiled model, checked against peft's add_adapter."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import adaptc
from adaptc.adapters.manage import add_adapter, delete_adapter
from adaptc.methods.base import Branch
from tests.compiler.models import NestedMLP, hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor, peft_config, share_adapter_weights

TOL = {"rtol": 1e-6, "atol": 1e-6}


def one(name, names, **fields):
    return {
        "version": 1,
        "adapters": {name: {"targets": {"kind": "names", "names": names}, **fields}},
    }


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),  # same layers
        (["q_proj"], ["v_proj", "gate_proj"]),  # new layers: wrapped or in a traced block
    ],
)
def test_added_adapter_matches_peft_add_adapter(first, second):
    model = tiny_hf("llama").eval()
    spec_a, spec_b = adaptc.load_spec(one("a", first)), adaptc.load_spec(one("b", second, r=4))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config(spec_a), adapter_name="a")
    theirs.add_adapter("b", peft_config(spec_b))
    ours = adaptc.compile(model, spec_a)
    assert add_adapter(ours, spec_b) == ["b"]
    assert adaptc.active_adapters(ours) == ("a",)  # a new adapter starts inactive
    share_adapter_weights(theirs, ours)
    x = hf_inputs("llama")
    for name in ("a", "b"):
        theirs.set_adapter(name)
        adaptc.set_active(ours, name)
        with torch.no_grad():
            torch.testing.assert_close(output_tensor(ours(**x)), output_tensor(theirs(**x)), **TOL)


def test_deleted_adapter_is_gone_and_the_other_stays():
    model = NestedMLP()
    data = {"version": 1, "adapters": {
        "a": {"targets": {"kind": "names", "names": ["fc1"]}, "init": "random"},
        "b": {"targets": {"kind": "names", "names": ["fc2"]}, "init": "random"}}}  # fmt: skip
    new = adaptc.compile(model, data)
    x = torch.randn(2, 12)
    before = new(x)
    delete_adapter(new, "b")
    assert "fc2.lora_b" not in new.code
    assert not any(n.startswith("blocks.0.fc2.lora_b") for n, _ in new.named_parameters())
    torch.testing.assert_close(new(x), before)  # "a" was active and still is
    delete_adapter(new, "a")  # the last one too, as with PEFT: the base model's outputs
    assert adaptc.active_adapters(new) == ()
    assert not any(isinstance(m, Branch) for m in new.modules())
    torch.testing.assert_close(new(x), model(x))
    add_adapter(new, one("c", ["fc1"]))  # and adapters can come back
    adaptc.set_active(new, "c")
    torch.testing.assert_close(new(x), model(x))  # B = 0


def test_add_adapter_errors():
    new = adaptc.compile(tiny_hf("opt"), one("a", ["q_proj"]))
    with pytest.raises(adaptc.CompileError, match="already has adapter 'a'"):
        add_adapter(new, one("a", ["v_proj"]))
    with pytest.raises(adaptc.CompileError, match="does not save yet"):
        add_adapter(new, one("b", ["v_proj"], modules_to_save=["lm_head"]))


def test_added_adapter_saves_and_reloads(tmp_path):
    model = tiny_hf("opt").eval()
    new = adaptc.compile(model, one("default", ["q_proj"], init="random"))
    add_adapter(new, one("other", ["v_proj", "fc1"], init="random"))
    adaptc.save_adapter(new, tmp_path)
    back = adaptc.load_adapter(model, tmp_path).eval()
    for name in ("default", "other"):
        adaptc.set_active(new, name)
        adaptc.set_active(back, name)
        with torch.no_grad():
            torch.testing.assert_close(
                back(**hf_inputs("opt")).logits, new.eval()(**hf_inputs("opt")).logits
            )
