"""Adapter operations with a method other than LoRA (IA3): switching, add/delete and
merging work for every method; the LoRA-shaped ones (mixed batches, combine, hotswap)
refuse another method's adapter by name."""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from peft import set_peft_model_state_dict

import adaptc
from adaptc.adapters import adapter_state_dict
from tests.compiler.models import hf_inputs, tiny_hf

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
IA3: dict[str, Any] = {
    "method": "ia3",
    "targets": {"kind": "names", "names": ["gate_proj", "up_proj", "down_proj"]},
    "feedforward": {"kind": "names", "names": ["down_proj"]},
}
LORA: dict[str, Any] = {"r": 4, "init": "random", "targets": {"kind": "names", "names": ["q_proj"]}}


def _both() -> tuple[torch.nn.Module, torch.nn.Module]:
    base = tiny_hf("llama").eval()
    model = adaptc.compile(base, {"version": 1, "adapters": {"lora": LORA, "ia3": IA3}})
    with torch.no_grad():  # IA3 starts as the identity: make it count
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.uniform_(0.5, 1.5)
    return base, model


def _peft_ia3(base: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """peft's IA3 alone on a copy of ``base``, with the vectors of ``model``'s adapter."""
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(target_modules=IA3["targets"]["names"], feedforward_modules=["down_proj"]),
    )
    state = adapter_state_dict(model, "ia3")  # PEFT's keys, as the adapter file holds them
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    return theirs.eval()


def test_two_methods_on_one_model_switch_and_stack():
    base, model = _both()
    x = hf_inputs("llama")
    with torch.no_grad():
        plain = base(**x).logits
        adaptc.set_active(model, ["ia3"])
        ia3 = model(**x).logits
        torch.testing.assert_close(ia3, _peft_ia3(base, model)(**x).logits, **EXACT)
        adaptc.set_active(model, ["lora"])
        lora = model(**x).logits
        adaptc.set_active(model, ["lora", "ia3"])
        both = model(**x).logits
        with adaptc.disabled(model):
            torch.testing.assert_close(model(**x).logits, plain, **EXACT)
    for a, b in [(ia3, plain), (lora, plain), (both, ia3), (both, lora)]:
        assert (a - b).abs().max() > 1e-4  # each adapter changes the output
    merged = adaptc.merge(model, adapters=["lora", "ia3"])
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, both, rtol=1e-5, atol=1e-5)


def test_an_ia3_adapter_is_added_and_deleted_in_place():
    base = tiny_hf("llama").eval()
    model = adaptc.compile(base, {"version": 1, "adapters": {"lora": LORA}})
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adaptc.add_adapter(model, {"version": 1, "adapters": {"ia3": IA3}}) == ["ia3"]
    assert adaptc.adapter_names(model) == ("lora", "ia3")
    assert all(dict(model.named_parameters())[n] is p for n, p in lora_params.items())
    adaptc.delete_adapter(model, "ia3")
    assert not [n for n, _ in model.named_parameters() if "ia3" in n]


@pytest.mark.parametrize("operation", ["mixed", "combine", "hotswap"])
def test_lora_shaped_operations_refuse_ia3_adapters_by_name(operation, tmp_path):
    _, model = _both()
    if operation == "mixed":
        refused = pytest.raises(adaptc.MixedBatchError, match=r"'ia3' is a ia3 adapter; mixed")
        with refused, adaptc.mixed_batch(model, ["lora", "ia3"]):
            pass
    elif operation == "combine":
        with pytest.raises(adaptc.CompileError, match=r"'ia3' is a ia3 adapter; only LoRA"):
            adaptc.combine_adapters(model, ["lora", "ia3"], [1.0, 1.0], "both", "cat")
        assert adaptc.adapter_names(model) == ("lora", "ia3")
    else:
        adaptc.save_adapter(model, tmp_path, adapters=["ia3"])
        with pytest.raises(adaptc.HotswapError, match=r"holds a ia3 adapter; hotswapping is for"):
            adaptc.hotswap(model, tmp_path / "ia3", "lora")
