"""The model passed to compile stays exactly as it was: before, after training, after merge."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import adaptc
from tests.compiler.models import NestedMLP, hf_inputs, tiny_hf


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, id(p), p.requires_grad, p.clone()) for n, p in model.named_parameters()],
        "buffers": [(n, id(b), b.clone()) for n, b in model.named_buffers()],
        "children": {n: dict(m._modules) for n, m in model.named_modules()},
        "hooks": {
            n: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for n, m in model.named_modules()
        },
        "attrs": {
            n: sorted(k for k in vars(m) if not k.startswith("_")) for n, m in model.named_modules()
        },
        "training": model.training,
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modules"] == after["modules"]
    assert before["children"] == after["children"]
    assert before["hooks"] == after["hooks"]
    assert before["attrs"] == after["attrs"]
    assert before["training"] == after["training"]
    for (n, i, rg, v), (n2, i2, rg2, v2) in zip(before["params"], after["params"], strict=True):
        assert (n, i, rg) == (n2, i2, rg2)
        assert torch.equal(v, v2), n
    for (n, i, v), (n2, i2, v2) in zip(before["buffers"], after["buffers"], strict=True):
        assert (n, i) == (n2, i2) and torch.equal(v, v2), n


SPECS = {
    "plain": {"targets": {"kind": "names", "names": ["q_proj", "v_proj", "fc1"]}, "r": 4},
    "bias-all": {"targets": {"kind": "names", "names": ["q_proj"]}, "bias": "all"},
    "pissa": {"targets": {"kind": "names", "names": ["fc1"]}, "init": "pissa", "r": 2},
    "save": {"targets": {"kind": "names", "names": ["q_proj"]}, "modules_to_save": ["lm_head"]},
    "dropout": {"targets": {"kind": "names", "names": ["v_proj"]}, "lora_dropout": 0.2},
}


@pytest.mark.parametrize("name", list(SPECS))
def test_original_untouched_by_compile_training_and_merge(name):
    model = tiny_hf("opt")
    calls = []
    model.model.decoder.layers[0].fc1.register_forward_hook(lambda m, i, o: calls.append(1))
    inputs = hf_inputs("opt")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    before = snapshot(model)

    new = adaptc.compile(model, {"version": 1, "adapters": {"default": SPECS[name]}})
    assert_same(before, snapshot(model))

    new.train()
    params = [p for p in new.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = new(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert_same(before, snapshot(model))

    merged = adaptc.merge(new)
    merged(**inputs)
    assert_same(before, snapshot(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected)
    # hooks of the original are carried over to the copy, but the copy's new ones stay there
    assert calls


def test_base_weights_are_shared_not_copied():
    model = tiny_hf("llama")
    new = adaptc.compile(
        model, {"version": 1, "adapters": {"default": {"targets": {"kind": "all-linear"}}}}
    )
    originals = {p.data_ptr() for p in model.parameters()}
    frozen = [p for p in new.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in originals for p in frozen)
    assert not any(p is q for p in new.parameters() for q in model.parameters())


def test_tied_weights_stay_tied():
    model = tiny_hf("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    new = adaptc.compile(model, {"version": 1, "adapters": {"default": {"r": 2}}})
    assert new.lm_head.weight is new.transformer.wte.weight


def test_batch_norm_statistics_of_the_original_do_not_move():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    before = model[1].running_mean.clone()
    new = adaptc.compile(
        model,
        {"version": 1, "adapters": {"default": {"targets": {"kind": "names", "names": ["3"]}}}},
    )
    new.train()
    new(torch.randn(4, 3, 8, 8))
    assert torch.equal(model[1].running_mean, before)


def test_new_hooks_on_the_copy_do_not_reach_the_original():
    model = NestedMLP()
    new = adaptc.compile(
        model,
        {"version": 1, "adapters": {"default": {"targets": {"kind": "names", "names": ["fc1"]}}}},
    )
    new.head.register_forward_hook(lambda m, i, o: None)
    assert not model.head._forward_hooks


def test_unmerged_model_stays_valid_after_merge():
    model = NestedMLP()
    new = adaptc.compile(
        model,
        {
            "version": 1,
            "adapters": {
                "default": {"targets": {"kind": "names", "names": ["fc1"]}, "init": "random"}
            },
        },
    )
    x = torch.randn(2, 12)
    before = new(x)
    adaptc.merge(new)
    torch.testing.assert_close(new(x), before, rtol=0, atol=0)


def test_hook_handles_held_by_the_model_act_on_the_copy():
    model = tiny_hf("llama")
    model.enable_input_require_grads()
    new = adaptc.compile(
        model,
        {
            "version": 1,
            "adapters": {"default": {"targets": {"kind": "names", "names": ["q_proj"]}}},
        },
    )
    hooks_before = len(model.model.embed_tokens._forward_hooks)
    new.disable_input_require_grads()
    assert len(model.model.embed_tokens._forward_hooks) == hooks_before
    assert len(new.model.embed_tokens._forward_hooks) == hooks_before - 1
