"""Gradient checkpointing on compiled transformers models.

A compiled model keeps its decoder blocks (transformers' ``GradientCheckpointingLayer``s),
so ``gradient_checkpointing_enable()`` checkpoints them with the adapter nodes inside: the
adapter gradients equal those of the same model without checkpointing, with reentrant and
non-reentrant checkpointing, however checkpointing was enabled. Frozen input embeddings with
reentrant checkpointing (PEFT's "element 0 of tensors does not require grad") need no user
action.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import adaptc
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import adapter_grads

FAMILY_TARGETS = {
    "llama": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "opt": ["q_proj", "v_proj", "fc1"],
    "gpt2": ["c_attn", "c_proj"],
}
FAMILIES = list(FAMILY_TARGETS)
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's rename
        yield


def _spec(family: str) -> dict:
    targets = {"kind": "names", "names": FAMILY_TARGETS[family]}
    return {"version": 1, "adapters": {"default": {"r": 4, "lora_alpha": 8, "targets": targets}}}


def _compiled(family: str, base: nn.Module | None = None) -> nn.Module:
    base = base if base is not None else tiny_hf(family)
    torch.manual_seed(1)  # the same adapter weights each time
    model = adaptc.compile(base, _spec(family))
    with torch.no_grad():  # non-zero B, so every adapter weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _grads(model: nn.Module, family: str) -> dict:
    """One training step (dropout on, same seed each time): the adapter gradients."""
    model.train()
    model.zero_grad()
    inputs = hf_inputs(family)
    torch.manual_seed(3)  # checkpointing replays the same dropout masks
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return adapter_grads(model)


def _count_lora_a_calls(model: nn.Module) -> list[int]:
    calls = [0]
    first = next(m for name, m in model.named_modules() if name.endswith("lora_A"))
    first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _assert_same(grads: dict, expected: dict) -> None:
    assert grads.keys() == expected.keys()
    for key, g in grads.items():
        assert g.abs().sum() > 0, key
        torch.testing.assert_close(g, expected[key], **TOL, msg=str(key))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_grads_equal_plain_grads(family, reentrant):
    plain = _compiled(family)
    expected = _grads(plain, family)
    model = copy.deepcopy(plain)
    calls = _count_lora_a_calls(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    _assert_same(_grads(model, family), expected)
    assert calls[0] == 2  # the block ran again in backward: it really was checkpointed


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_keep_their_checkpointing_class(family):
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = tiny_hf(family)
    model = _compiled(family, base)

    def blocks(m: nn.Module) -> list[str]:
        return [n for n, x in m.named_modules() if isinstance(x, GradientCheckpointingLayer)]

    assert blocks(model) == blocks(base) != []


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_embeddings_with_reentrant_checkpointing_need_no_user_action(family):
    """Checkpointing enabled on the original, without the input-embedding hook that makes
    embeddings require grad: PEFT users get "element 0 of tensors does not require grad"
    (or silently no adapter gradient); the compiled model trains."""
    base = tiny_hf(family)
    expected = _grads(_compiled(family, copy.deepcopy(base)), family)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()
    hooks_before = {n: dict(m._forward_pre_hooks) for n, m in base.named_modules()}
    model = _compiled(family, base)
    assert model.get_input_embeddings().weight.requires_grad is False
    _assert_same(_grads(model, family), expected)
    # the original is untouched: no hook was added to it
    assert {n: dict(m._forward_pre_hooks) for n, m in base.named_modules()} == hooks_before


def test_enabling_on_the_compiled_model_leaves_the_original_alone():
    base = tiny_hf("llama")
    hooks_before = {n: dict(m._forward_hooks) for n, m in base.named_modules()}
    model = _compiled("llama", base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_gradient_checkpointing
    assert not base.is_gradient_checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    assert {n: dict(m._forward_hooks) for n, m in base.named_modules()} == hooks_before


def test_disabling_checkpointing_restores_plain_training():
    model = _compiled("llama")
    expected = _grads(copy.deepcopy(model), "llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.gradient_checkpointing_disable()
    calls = _count_lora_a_calls(model)
    _assert_same(_grads(model, "llama"), expected)
    assert calls[0] == 1


def test_checkpointed_model_in_eval_and_no_grad_is_unchanged():
    model = _compiled("llama")
    inputs = hf_inputs("llama")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with torch.no_grad():
        out = model(**inputs).logits  # llama has no dropout: train mode computes the same
    torch.testing.assert_close(out, expected)


def test_merged_model_has_no_checkpointing_hooks():
    from adaptc.compiler.trace import _checkpointed_input_requires_grad

    model = tiny_hf("llama")
    new = adaptc.compile(
        model, {"version": 1, "adapters": {"default": {"targets": {"kind": "all-linear"}}}}
    )
    hooked = [
        m
        for m in new.modules()
        if _checkpointed_input_requires_grad in m._forward_pre_hooks.values()
    ]
    assert hooked
    merged = adaptc.merge(new)
    assert not [
        m
        for m in merged.modules()
        if _checkpointed_input_requires_grad in m._forward_pre_hooks.values()
    ]
