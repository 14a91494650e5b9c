"""Graph modules with identical graphs share generated code, and never disturb each other."""

from __future__ import annotations

import copy
import pickle

import torch

import adaptc
from tests.compiler.models import hf_inputs, tiny_hf

SPEC = {
    "version": 1,
    "adapters": {
        "a": {"r": 4, "init": "random", "targets": {"kind": "all-linear"}},
        "b": {"r": 2, "init": "random", "targets": {"kind": "all-linear"}},
    },
}


def q_proj(model, layer):
    return model.model.layers[layer].self_attn.q_proj


def test_identical_graphs_share_a_class_and_different_ones_do_not():
    model = adaptc.compile(tiny_hf("llama").eval(), SPEC)
    assert type(q_proj(model, 0)) is type(q_proj(model, 1))
    before = type(q_proj(model, 0))
    adaptc.set_active(model, ["b"])
    assert type(q_proj(model, 0)) is not before and "lora_b" in q_proj(model, 0).code
    adaptc.set_active(model, ["a"])
    assert type(q_proj(model, 0)) is before  # switching back: the same class (dynamo's cache)


def test_models_sharing_code_run_their_own_adapters():
    base = tiny_hf("llama").eval()
    one = adaptc.compile(base, SPEC)
    two = adaptc.compile(base, SPEC)
    adaptc.set_active(two, ["b"])
    x = hf_inputs("llama")
    with torch.no_grad():
        out_one, out_two = one(**x).logits, two(**x).logits
        adaptc.set_active(one, ["b"])
        two.load_state_dict(one.state_dict())
        torch.testing.assert_close(two(**x).logits, one(**x).logits, rtol=0, atol=0)
    assert not torch.allclose(out_one, out_two)


def test_deepcopy_and_pickle_keep_working():
    model = adaptc.compile(tiny_hf("llama").eval(), SPEC)
    x = hf_inputs("llama")
    with torch.no_grad():
        expected = model(**x).logits
        torch.testing.assert_close(copy.deepcopy(model)(**x).logits, expected, rtol=0, atol=0)
        restored = pickle.loads(pickle.dumps(q_proj(model, 0)))
        h = torch.randn(2, 16)
        torch.testing.assert_close(restored(h), q_proj(model, 0)(h), rtol=0, atol=0)
