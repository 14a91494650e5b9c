"""adaptc.merge and ``merge: true``: plain layers with W + s·ΔW, no adapter nodes left."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import adaptc
from adaptc.compiler.trace import AdaptedLayer
from adaptc.methods.lora.branch import LoraBranch
from tests.compiler.models import NestedMLP, hf_inputs, tiny_hf

ALL = {"kind": "all-linear"}


def compile_random(model, **adapter):
    adapter.setdefault("init", "random")
    return adaptc.compile(model, {"version": 1, "adapters": {"default": adapter}})


def no_adapter_left(model: nn.Module) -> None:
    assert not any(isinstance(m, (LoraBranch, AdaptedLayer)) for m in model.modules())
    for m in model.modules():
        if isinstance(m, fx.GraphModule):
            assert "lora" not in m.code


CASES = [(f, {}) for f in ("opt", "gpt2", "llama", "mt5", "bert")] + [
    (f, {"use_rslora": True, "lora_bias": True})
    for f in ("opt", "gpt2", "bert")  # have biases
]


@pytest.mark.parametrize(("family", "extra"), CASES)
def test_merged_hf_model_gives_the_same_outputs(family, extra):
    model = tiny_hf(family).eval()
    new = compile_random(model, targets=ALL if family != "mt5" else None, r=4, **extra).eval()
    merged = adaptc.merge(new).eval()
    no_adapter_left(merged)
    assert type(merged) is type(model)
    with torch.no_grad():
        a = new(**hf_inputs(family)).logits
        b = merged(**hf_inputs(family)).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_merged_model_has_the_original_structure_and_keys():
    model = tiny_hf("llama")
    merged = adaptc.merge(
        compile_random(model, targets={"kind": "names", "names": ["q_proj", "v_proj"]})
    )
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(merged.state_dict()) == set(model.state_dict())


def test_merge_flag_in_spec():
    model = NestedMLP()
    merged = compile_random(model, targets={"kind": "names", "names": ["fc1"]}, lora_alpha=4)
    no_adapter_left(adaptc.merge(merged))
    direct = adaptc.compile(
        model,
        {
            "version": 1,
            "merge": True,
            "adapters": {"default": {"targets": {"kind": "names", "names": ["fc1"]}}},
        },
    )
    no_adapter_left(direct)
    x = torch.randn(2, 12)
    torch.testing.assert_close(direct(x), model(x))  # zero B: merge changes nothing


def test_merged_graph_costs_what_the_base_costs():
    model = NestedMLP()
    new = compile_random(model, targets={"kind": "names", "names": ["fc1", "fc2"]})
    merged = adaptc.merge(new)
    base = fx.symbolic_trace(model)
    ops = ("call_module", "call_function", "call_method")

    def count(g: fx.GraphModule) -> int:
        return sum(1 for n in g.graph.nodes if n.op in ops)

    assert count(merged) == count(base)


def test_safe_merge_names_adapter_and_module():
    new = compile_random(NestedMLP(), targets={"kind": "names", "names": ["fc1"]})
    with torch.no_grad():
        new.blocks[1]["fc1"].lora_default.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(adaptc.MergeError, match=r"adapter 'default' into blocks\.1\.fc1"):
        adaptc.merge(new)
    adaptc.merge(new, safe=False)  # the caller's choice


def test_lora_bias_on_a_layer_without_bias_warns_then_cannot_merge():
    model = tiny_hf("llama")
    with pytest.warns(adaptc.AdaptcWarning, match=r"has no bias: merging will not be possible"):
        new = compile_random(model, targets={"kind": "names", "names": ["q_proj"]}, lora_bias=True)
    with pytest.raises(ValueError, match="cannot merge lora_bias, the layer has no bias"):
        adaptc.merge(new)


def test_merge_needs_a_compiled_model():
    with pytest.raises(adaptc.CompileError, match=r"takes a model returned by adaptc\.compile"):
        adaptc.merge(NestedMLP())


def test_merge_bf16_within_bf16_tolerance():
    model = tiny_hf("llama").to(torch.bfloat16).eval()
    new = compile_random(model, targets=ALL, r=4).eval()
    merged = adaptc.merge(new).eval()
    with torch.no_grad():
        a = new(**hf_inputs("llama")).logits.float()
        b = merged(**hf_inputs("llama")).logits.float()
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def test_merged_model_is_plain_and_can_be_compiled_again():
    model = tiny_hf("bert")
    spec = {
        "version": 1,
        "task_type": "SEQ_CLS",
        "adapters": {
            "default": {"targets": {"kind": "names", "names": ["query"]}, "init": "random"}
        },
    }
    merged = adaptc.merge(adaptc.compile(model, spec))
    assert set(merged.state_dict()) == set(model.state_dict())  # classifier copy unwrapped
    again = adaptc.compile(merged, spec)  # merge, then train another adapter
    assert any(isinstance(m, LoraBranch) for m in again.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_merged_hf_model_saves_a_checkpoint_transformers_loads(family, tmp_path):
    import transformers as tf

    model = tiny_hf(family).eval()
    merged = adaptc.merge(compile_random(model, targets=ALL, r=4)).eval()
    merged.save_pretrained(tmp_path)
    auto = tf.AutoModelForSequenceClassification if family == "bert" else tf.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        expected = merged(**hf_inputs(family)).logits
        torch.testing.assert_close(loaded(**hf_inputs(family)).logits, expected)
