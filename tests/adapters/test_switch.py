"""Active adapters and ``disabled``: the base model alone gives the original's outputs."""

from __future__ import annotations

import pytest
import torch

import adaptc
from tests.compiler.models import NestedMLP, hf_inputs, tiny_hf


def two_adapters():
    fc = {"kind": "names", "names": ["fc1"]}
    return {
        "version": 1,
        "adapters": {
            "first": {"targets": fc, "init": "random"},
            "second": {"targets": fc, "init": "random", "r": 2},
        },
    }


def test_disabled_gives_the_original_outputs_exactly():
    model = tiny_hf("bert").eval()
    spec = {
        "version": 1,
        "task_type": "SEQ_CLS",
        "adapters": {
            "default": {"targets": {"kind": "names", "names": ["query"]}, "init": "random"}
        },
    }
    new = adaptc.compile(model, spec).eval()
    x = hf_inputs("bert")
    with torch.no_grad():
        expected = model(**x).logits
        adapted = new(**x).logits
        with adaptc.disabled(new):
            base = new(**x).logits
        again = new(**x).logits
    torch.testing.assert_close(base, expected, rtol=0, atol=0)
    assert not torch.allclose(adapted, expected)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_first_adapter_is_active_and_switching_works():
    model = NestedMLP()
    new = adaptc.compile(model, two_adapters())
    assert adaptc.active_adapters(new) == ("first",)
    assert "lora_first" in new.code and "lora_second" not in new.code
    x = torch.randn(2, 12)
    out_first = new(x)
    adaptc.set_active(new, "second")
    assert "lora_second" in new.code and "lora_first" not in new.code
    assert not torch.allclose(out_first, new(x))
    adaptc.set_active(new, ["first", "second"])  # both: their updates add up, as in PEFT
    assert "lora_first" in new.code and "lora_second" in new.code


def test_unknown_adapter_is_an_error():
    new = adaptc.compile(NestedMLP(), two_adapters())
    with pytest.raises(adaptc.CompileError, match="no adapter 'c'"):
        adaptc.set_active(new, "c")
