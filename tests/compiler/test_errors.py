"""Compile errors a user sees: one line, what and where, nothing half-built."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adaptc
from tests.compiler.models import NestedMLP, tiny_hf


def compile_(model, **adapter):
    return adaptc.compile(model, {"version": 1, "adapters": {"default": adapter}})


def names(*n):
    return {"kind": "names", "names": list(n)}


def test_targets_matching_nothing_list_closest_names_and_layer_types():
    with pytest.raises(adaptc.CompileError) as info:
        compile_(tiny_hf("gpt2"), targets=names("q_proj", "v_proj"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("targets.names [q_proj, v_proj] matched no module of GPT2LMHeadModel")
    assert "closest names: c_proj" in message
    assert "Conv1D×8" in message


def test_an_entry_matching_nothing_warns_by_name():
    with pytest.warns(adaptc.AdaptcWarning, match="v_proj"):
        compile_(tiny_hf("gpt2"), targets=names("c_attn", "v_proj"))


def test_unsupported_layer_lists_the_registry():
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    with pytest.raises(adaptc.CompileError) as info:
        compile_(model, targets=names("0"))
    message = str(info.value)
    assert "LayerNorm" in message
    for name in adaptc.layers.kind_names():
        assert name in message


def test_container_target_is_refused():
    with pytest.raises(adaptc.CompileError, match=r"LlamaAttention.*container"):
        compile_(tiny_hf("llama"), targets=names("self_attn"))


def test_rank_too_large_for_pissa():
    with pytest.raises(adaptc.CompileError, match=r"r=64 is larger than the layer allows"):
        compile_(NestedMLP(), targets=names("fc1"), init="pissa", r=64)


def test_rank_above_layer_dimensions_warns():
    with pytest.warns(adaptc.AdaptcWarning, match=r"r=64 exceeds min\(in_features, out_features\)"):
        compile_(NestedMLP(), targets=names("head"), r=64)


def test_no_default_targets_for_custom_models():
    with pytest.raises(adaptc.CompileError, match=r"no config\.model_type"):
        compile_(NestedMLP())


def test_compiling_twice_with_the_same_adapter_name():
    once = compile_(NestedMLP(), targets=names("fc1"))
    with pytest.raises(adaptc.CompileError, match="already has adapter 'default'"):
        compile_(once, targets=names("fc1"))


def test_spec_for_another_architecture():
    with pytest.raises(
        adaptc.CompileError, match="matched no module of BertForSequenceClassification"
    ):
        compile_(tiny_hf("bert"), targets=names("q_proj", "k_proj", "gate_proj"))


def test_nothing_half_built_on_error():
    model = tiny_hf("opt")
    before = {n: (id(m), dict(m._modules)) for n, m in model.named_modules()}
    with pytest.raises(adaptc.CompileError):
        compile_(model, targets=names("q_proj", "fc1"), init="pissa", r=999)
    assert before == {n: (id(m), dict(m._modules)) for n, m in model.named_modules()}


def test_invalid_spec_is_a_spec_error():
    with pytest.raises(adaptc.SpecError, match=r"adapters\.default\.r: must be > 0"):
        compile_(NestedMLP(), r=0)


def test_no_warning_for_a_clean_compile():
    with warnings.catch_warnings():
        warnings.simplefilter("error", adaptc.AdaptcWarning)
        compile_(tiny_hf("llama"), targets=names("q_proj"), r=4)
    assert torch.is_grad_enabled()


def test_multihead_attention_refuses_what_peft_refuses_clearly():
    # LoRA on nn.MultiheadAttention: tests/methods/test_lora_mha.py
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(adaptc.CompileError) as info:
        compile_(model, targets={"kind": "types", "types": ["nn.MultiheadAttention"]})
    assert str(info.value) == (
        "0: nn.MultiheadAttention has query/key/value of different sizes (kdim/vdim); only "
        "one size is supported (as in PEFT)"
    )
