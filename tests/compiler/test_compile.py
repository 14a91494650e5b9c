"""adaptc.compile: structure of the new model, the traceable frontier, trainability."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import adaptc
from adaptc.compiler.trace import AdaptedLayer
from adaptc.methods.lora.branch import LoraBranch
from tests.compiler.models import (
    CalledTwice,
    DummyModel,
    ModeDependent,
    NestedMLP,
    Untraceable,
    hf_inputs,
    tiny_hf,
)


def spec(targets=None, **adapter):
    if targets is not None:
        adapter["targets"] = targets
    return {"version": 1, "adapters": {"default": adapter}}


def names(*n):
    return {"kind": "names", "names": list(n)}


def lora_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if "adaptc" in n.meta]


def test_custom_model_becomes_one_graph_with_lora_nodes():
    model = DummyModel()
    new = adaptc.compile(model, spec(names("linear"), r=4, lora_alpha=8))
    assert isinstance(new, fx.GraphModule)
    code = new.code
    assert "self.linear.lora_default.lora_A(" in code
    assert "self.linear.lora_default.lora_B(" in code
    assert "dropout" not in code  # p = 0: no dropout node at all
    assert "* 2.0" in code  # scaling lora_alpha / r


def test_dropout_node_only_when_p_positive():
    saved = {**spec(names("linear"), lora_dropout=0.1), "compile": {"dropout": "save"}}
    assert "self.linear.lora_default.lora_dropout(" in adaptc.compile(DummyModel(), saved).code
    # by default, dropout and lora_A are one function (adaptc.compiler.dropout)
    new = adaptc.compile(DummyModel(), spec(names("linear"), lora_dropout=0.1))
    assert "dropout_linear(" in new.code and "lora_dropout(" not in new.code


def test_forward_signature_keeps_positional_and_keyword_arguments():
    model = NestedMLP()
    new = adaptc.compile(model, spec(names("fc1")))
    x = torch.randn(2, 12)
    torch.testing.assert_close(new(x), model(x))  # B = 0 at init: same outputs
    torch.testing.assert_close(new(x, 2.0), model(x, 2.0))
    torch.testing.assert_close(new(x=x, scale=3.0), model(x=x, scale=3.0))


def test_module_lists_and_dicts_keep_their_types():
    new = adaptc.compile(NestedMLP(), spec(names("fc1")))
    assert isinstance(new.blocks, nn.ModuleList)
    assert isinstance(new.blocks[0], nn.ModuleDict)
    assert isinstance(new.blocks[0]["fc1"].lora_default, LoraBranch)


def test_layer_called_twice_gets_the_branch_at_both_calls():
    model = CalledTwice()
    new = adaptc.compile(model, spec(names("proj"), init="random"))
    calls = [n for n in new.graph.nodes if n.target == "proj.lora_default.lora_A"]
    assert len(calls) == 2
    x = torch.randn(3, 8)
    branch = new.proj.lora_default
    with torch.no_grad():  # reference: the branch applied at each call
        h = torch.tanh(model.proj(x) + branch(x))
        h = torch.tanh(model.proj(h) + branch(h))
        expected = model.out(model.shared(model.shared(h)))
    torch.testing.assert_close(new(x), expected)


def test_shared_module_is_adapted_once_and_stays_shared():
    new = adaptc.compile(CalledTwice(), spec(names("shared")))
    assert new.alias is new.shared
    assert sum(isinstance(m, LoraBranch) for m in new.modules()) == 1


def test_untraceable_root_traces_the_largest_subtrees():
    model = Untraceable()
    new = adaptc.compile(model, spec(names("fc1", "gate"), init="random"))
    assert type(new) is Untraceable
    assert isinstance(new.inner, fx.GraphModule)  # the inner MLP traced whole
    assert isinstance(new.gate, AdaptedLayer)  # no traceable ancestor: its own graph
    x = torch.randn(2, 8).abs()
    y = new(x)
    assert y.shape == (2, 3)


def test_code_that_depends_on_training_mode_is_not_frozen():
    model = ModeDependent()
    new = adaptc.compile(model, spec(names("fc")))
    x = torch.randn(2, 6)
    new.train()
    model.train()
    torch.testing.assert_close(new(x), model(x))
    new.eval()
    model.eval()
    torch.testing.assert_close(new(x), model(x))


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "mt5", "bert"])
def test_hf_models_keep_their_class_and_config(family):
    model = tiny_hf(family)
    new = adaptc.compile(model, spec())  # PEFT's default targets for the model type
    assert type(new) is type(model)
    assert new.config.to_dict() == model.config.to_dict()
    assert new.config is not model.config
    graphs = [m for m in new.modules() if isinstance(m, fx.GraphModule)]
    assert graphs and all(lora_nodes(g) for g in graphs)
    model.eval()
    new.eval()
    with torch.no_grad():
        a, b = model(**hf_inputs(family)), new(**hf_inputs(family))
    key = "logits"
    torch.testing.assert_close(getattr(b, key), getattr(a, key))


def test_hf_model_generates():
    model = tiny_hf("llama").eval()
    new = adaptc.compile(model, spec(names("q_proj", "v_proj"), init="random")).eval()
    ids = torch.tensor([[1, 2, 3]])
    out = new.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_mlp_targets_trace_with_their_block():
    new = adaptc.compile(tiny_hf("llama"), spec(names("gate_proj", "up_proj", "down_proj")))
    mlp = new.model.layers[0].mlp
    assert isinstance(mlp, fx.GraphModule)
    assert "self.gate_proj.lora_default.lora_A" in mlp.code
    assert mlp.config is not None  # plain attributes kept for the parent's code


def test_only_adapter_parameters_train():
    model = tiny_hf("opt")
    new = adaptc.compile(model, spec(names("q_proj", "v_proj")))
    trainable = {n for n, p in new.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_default." in n for n in trainable)


def test_bias_modes_train_biases_in_copies():
    model = tiny_hf("opt")
    for bias, check in [
        ("all", lambda n: n.endswith(".bias")),
        ("lora_only", lambda n: n.endswith(("q_proj.bias", "v_proj.bias"))),
    ]:
        new = adaptc.compile(model, spec(names("q_proj", "v_proj"), bias=bias))
        params = dict(new.named_parameters())
        for name, p in params.items():
            base = name.replace("base_layer.", "")
            if ".lora_default." in name:
                assert p.requires_grad
            elif check(base):
                assert p.requires_grad, name
                original = dict(model.named_parameters())[base]
                assert p.data_ptr() != original.data_ptr()  # its own storage
            else:
                assert not p.requires_grad, name


def test_modules_to_save_are_trainable_copies():
    model = tiny_hf("bert")
    data = spec(names("query", "value"), modules_to_save=["classifier"])
    new = adaptc.compile(model, {**data, "task_type": "SEQ_CLS"})
    wrapper = new.classifier
    copy_ = wrapper.modules_to_save["default"]
    assert all(p.requires_grad for p in copy_.parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert copy_.weight.data_ptr() != model.classifier.weight.data_ptr()
    assert wrapper.weight is copy_.weight  # attribute reads reach the active copy


def test_pissa_residual_is_new_memory():
    model = NestedMLP()
    new = adaptc.compile(model, spec(names("fc1"), init="pissa", r=4))
    original = model.blocks[0]["fc1"].weight
    compiled = new.blocks[0]["fc1"].weight
    assert compiled.data_ptr() != original.data_ptr()
    x = torch.randn(2, 12)
    torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-5)


def test_attribute_reads_reach_the_wrapped_layer():
    model = tiny_hf("llama")
    new = adaptc.compile(model, spec(names("q_proj")))
    q = new.model.layers[0].self_attn.q_proj
    assert isinstance(q, AdaptedLayer)
    assert q.weight is q.base_layer.weight
    assert q.in_features == 16


def test_deepcopy_of_compiled_model_runs():
    new = adaptc.compile(NestedMLP(), spec(names("fc1"), init="random"))
    twin = copy.deepcopy(new)
    x = torch.randn(2, 12)
    torch.testing.assert_close(twin(x), new(x))


def test_compiled_models_pickle_with_torch_save(tmp_path):
    for model in (NestedMLP(), tiny_hf("llama")):
        new = adaptc.compile(model, spec(names("fc1", "q_proj"), init="random")).eval()
        torch.save(new, tmp_path / "m.pt")
        again = torch.load(tmp_path / "m.pt", weights_only=False).eval()
        x = torch.randn(2, 12) if isinstance(model, NestedMLP) else torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            a, b = new(x), again(x)
        a = a if isinstance(a, torch.Tensor) else a.logits
        b = b if isinstance(b, torch.Tensor) else b.logits
        torch.testing.assert_close(b, a)
