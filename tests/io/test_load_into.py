"""``load_adapter_into`` a compiled model: the saved adapter joins the others in place
(``load_adapter`` only builds new models, from a base model)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import adaptc
from tests.compiler.models import hf_inputs, tiny_hf

TARGETS = ["q_proj", "v_proj"]


def _saved_by_peft(base, directory, r=4):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, target_modules=TARGETS))
    for p in theirs.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    theirs.save_pretrained(directory)
    return theirs.eval()


def test_a_saved_adapter_is_added_in_place_and_equals_peft(tmp_path):
    base = tiny_hf("llama").eval()
    theirs = _saved_by_peft(base, tmp_path / "saved")
    spec = {"version": 1, "adapters": {"own": {"r": 2, "targets": {"kind": "all-linear"}}}}
    model = adaptc.compile(base, spec)
    own = {n: p for n, p in model.named_parameters()}
    names = adaptc.load_adapter_into(model, tmp_path / "saved", adapter_name="loaded")
    assert names == ["loaded"]
    assert adaptc.adapter_names(model) == ("own", "loaded")
    assert adaptc.active_adapters(model) == ("own",)  # the new one starts inactive
    for name, p in model.named_parameters():  # existing parameter objects stay
        if name in own:
            assert p is own[name]
    loaded = [p for n, p in model.named_parameters() if ".lora_loaded." in n]
    assert loaded and not any(p.requires_grad for p in loaded)
    adaptc.set_active(model, ["loaded"])
    x = hf_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, theirs(**x).logits, rtol=1e-6, atol=1e-6)


def test_trainable_loads_trainable(tmp_path):
    base = tiny_hf("llama")
    _saved_by_peft(base, tmp_path / "saved")
    model = adaptc.compile(
        base, {"version": 1, "adapters": {"own": {"targets": {"kind": "all-linear"}}}}
    )
    adaptc.load_adapter_into(model, tmp_path / "saved", adapter_name="more", trainable=True)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_more." in n)


def test_a_taken_name_is_an_error_with_a_hint(tmp_path):
    base = tiny_hf("llama")
    _saved_by_peft(base, tmp_path / "saved")
    model = adaptc.compile(
        base, {"version": 1, "adapters": {"default": {"targets": {"kind": "all-linear"}}}}
    )
    with pytest.raises(
        adaptc.AdapterLoadError, match=r"already has adapter 'default' \(pass adapter_name=\)$"
    ):
        adaptc.load_adapter_into(model, tmp_path / "saved")
    assert adaptc.adapter_names(model) == ("default",)


def test_a_broken_file_leaves_nothing_half_added(tmp_path):
    base = tiny_hf("llama")
    _saved_by_peft(base, tmp_path / "saved")
    (tmp_path / "saved" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    model = adaptc.compile(
        base, {"version": 1, "adapters": {"own": {"targets": {"kind": "all-linear"}}}}
    )
    keys = set(model.state_dict())
    with pytest.raises(adaptc.AdapterLoadError, match="is not a readable safetensors file"):
        adaptc.load_adapter_into(model, tmp_path / "saved", adapter_name="new")
    assert adaptc.adapter_names(model) == ("own",)
    assert set(model.state_dict()) == keys


def test_the_loaded_adapter_mixes_with_the_others(tmp_path):
    base = tiny_hf("llama").eval()
    theirs = _saved_by_peft(base, tmp_path / "saved")
    model = adaptc.compile(
        base,
        {
            "version": 1,
            "adapters": {"own": {"r": 2, "init": "random", "targets": {"kind": "all-linear"}}},
        },
    )
    adaptc.load_adapter_into(model, tmp_path / "saved", adapter_name="loaded")
    x = hf_inputs("llama")["input_ids"]
    with torch.no_grad(), adaptc.mixed_batch(model, ["loaded", "own"]):
        mixed = model(input_ids=x).logits
    with torch.no_grad():
        torch.testing.assert_close(mixed[:1], theirs(input_ids=x[:1]).logits, rtol=1e-5, atol=1e-5)


def test_each_name_does_one_thing(tmp_path):
    base = tiny_hf("llama")
    _saved_by_peft(base, tmp_path / "saved")
    model = adaptc.compile(
        base, {"version": 1, "adapters": {"own": {"targets": {"kind": "all-linear"}}}}
    )
    with pytest.raises(adaptc.AdapterLoadError, match=r"adaptc\.load_adapter_into\(model, source"):
        adaptc.load_adapter(model, tmp_path / "saved")
    with pytest.raises(adaptc.AdapterLoadError, match=r"for a base model use adaptc\.load_adapter"):
        adaptc.load_adapter_into(base, tmp_path / "saved")
    assert adaptc.adapter_names(model) == ("own",)
