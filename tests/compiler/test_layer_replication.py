"""``layer_replication``: a new stack of layers from ranges of the model's layers, the copies
sharing the base weights, each with its own adapter — against the real peft on the same
weights, with the user's model left as it was."""

from __future__ import annotations

import copy
import json
from typing import Any

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc
from adaptc.compiler import CompileError, compiled_info
from adaptc.io.load import AdapterLoadError
from adaptc.io.merge_checkpoint import merge_checkpoint
from adaptc.methods.base import Branch
from adaptc.spec import SpecError
from tests.compiler.models import DummyModel
from tests.compiler.parity import (
    adapter_grads,
    build_pair,
    lora_layers,
    output_tensor,
    peft_config,
    peft_grads,
)

RANGES = [[0, 2], [1, 4]]  # 4 layers -> layers 0 1 1 2 3
ORDER = [0, 1, 1, 2, 3]
TARGETS = {"kind": "names", "names": ["q_proj", "v_proj", "down_proj"]}
NOT_FOUND = (
    "layer_replication: Could not locate the layers attribute in the model. "
    "Expected Llama, Bert or Falcon compatible architectures."
)


def llama_config(**extra: Any) -> tf.LlamaConfig:
    settings = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64}  # fmt: skip
    return tf.LlamaConfig(**{**settings, **extra})


def tiny_llama(**extra: Any) -> nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(llama_config(**extra)).eval()


def spec(**adapter: Any) -> dict[str, Any]:
    settings = {"r": 4, "targets": TARGETS, "layer_replication": RANGES, **adapter}
    return {"version": 1, "adapters": {"default": settings}}


def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return output_tensor(model(input_ids=x))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def counts_line(model: nn.Module, capsys: pytest.CaptureFixture[str]) -> str:
    if hasattr(model, "peft_config"):  # peft's model (or the facade's) prints its own
        model.print_trainable_parameters()
    else:
        adaptc.print_trainable_parameters(model)
    return capsys.readouterr().out.strip()


def with_trained_b(peft_model: nn.Module, seed: int = 3) -> None:
    """Give peft's B matrices values (its init leaves them zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything of the user's model that compiling could touch."""
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "children": {n: dict(m._modules) for n, m in model.named_modules()},
        "attrs": {n: dict(vars(m)) for n, m in model.named_modules()},
        "params": [(n, id(p), p.requires_grad, p.clone()) for n, p in model.named_parameters()],
        "config": model.config.to_dict(),
        "config_id": id(model.config),
        "layer_idx": [layer.self_attn.layer_idx for layer in model.model.layers],
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("modules", "children", "config", "config_id", "layer_idx"):
        assert before[key] == after[key], key
    for name, attrs in before["attrs"].items():  # same attribute objects, none added
        assert attrs.keys() == after["attrs"][name].keys(), name
        assert all(v is after["attrs"][name][k] for k, v in attrs.items()), name
    for (n, i, rg, v), (n2, i2, rg2, v2) in zip(before["params"], after["params"], strict=True):
        assert (n, i, rg) == (n2, i2, rg2)
        assert torch.equal(v, v2), n


# --- the structure -------------------------------------------------------------------


def test_new_model_has_the_replicated_stack_sharing_the_base_weights():
    base = tiny_llama()
    model = adaptc.compile(base, spec())
    layers = model.model.layers
    assert len(layers) == 5 and model.config.num_hidden_layers == 5
    assert model.model.config is model.config
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]
    assert len({id(layer) for layer in layers}) == 5  # distinct modules, as peft's copies
    for position, index in enumerate(ORDER):  # frozen weights: the original's storage
        mine, theirs = layers[position].self_attn.k_proj.weight, base.model.layers[index]
        assert mine is not theirs.self_attn.k_proj.weight
        assert mine.data_ptr() == theirs.self_attn.k_proj.weight.data_ptr()
        assert not mine.requires_grad
    assert layers[1].self_attn.k_proj.weight is layers[2].self_attn.k_proj.weight  # one object
    q1, q2 = (inner(layers[i].self_attn.q_proj) for i in (1, 2))
    assert q1.weight is q2.weight
    assert branch(layers[1].self_attn.q_proj) is not branch(layers[2].self_attn.q_proj)
    trainable, total = adaptc.trainable_parameters(model)
    assert total == sum(p.numel() for p in base.parameters()) + trainable  # shared once


def inner(module: nn.Module) -> nn.Module:
    """The target layer inside its graph wrapper (or itself)."""
    return module._modules.get("base_layer", module)


def branch(module: nn.Module) -> nn.Module:
    layer = inner(module)
    return next(c for c in layer.children() if isinstance(c, Branch))


def test_original_model_is_untouched_by_compile_training_and_merge():
    base = tiny_llama(attention_bias=True)  # with biases that train
    before = snapshot(base)
    model = adaptc.compile(base, spec(bias="all"))
    train_step(model)
    merged = adaptc.merge(model)
    logits(merged, ids())
    assert_unchanged(before, snapshot(base))
    assert base.config.num_hidden_layers == 4 and len(base.model.layers) == 4


# --- parity with peft ----------------------------------------------------------------


def test_outputs_targets_and_counts_match_peft(capsys):
    base = tiny_llama()
    peft_model, model = build_pair(base, spec())
    x = ids()
    close(logits(model, x), logits(peft_model, x))
    paths = [t.path for t in adaptc.build_plan(base, spec()).targets]
    assert paths == list(lora_layers(peft_model))
    assert "model.layers.4.self_attn.q_proj" in paths
    assert counts_line(model, capsys) == counts_line(peft_model, capsys)
    assert peft_model.base_model.model.config.num_hidden_layers == 5  # peft sets it too


def test_gradients_and_a_training_step_match_peft():
    peft_model, model = build_pair(tiny_llama(), spec())
    x = ids()
    for m in (peft_model, model):
        m.train()
        logits(m, x).logsumexp(-1).mean().backward()
    ours = adapter_grads(model)
    theirs = peft_grads(peft_model, ours)
    for key, grad in ours.items():
        close(grad, theirs[key], 1e-5)
    for m in (peft_model, model):
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
        m.eval()
    close(logits(model, x), logits(peft_model, x), 1e-5)


def train_step(model: nn.Module) -> None:
    model.train()
    logits(model, ids()).logsumexp(-1).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()


def test_generate_matches_peft_and_its_cache():
    peft_model, model = build_pair(tiny_llama(), spec())
    x = ids(1, 5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    tokens = model.generate(x, **kwargs)
    assert tokens.shape == (1, 11)
    assert torch.equal(tokens, peft_model.generate(input_ids=x, **kwargs))
    assert torch.equal(tokens, model.generate(x, use_cache=False, **kwargs))  # 5 cache layers


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_one_bias_per_original_as_peft(bias, capsys, tmp_path):
    base = tiny_llama(attention_bias=True)
    peft_model, model = build_pair(base, spec(bias=bias))
    assert counts_line(model, capsys) == counts_line(peft_model, capsys)
    q1, q2 = (inner(model.model.layers[i].self_attn.q_proj) for i in (1, 2))
    assert q1.bias is q2.bias and q1.bias.requires_grad  # peft's copies share it too
    for m in (peft_model, model):
        train_step(m)  # the biases change (each model its own)
    close(logits(model, ids()), logits(peft_model, ids()), 1e-5)
    adaptc.save_adapter(model, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "theirs")
    keys = [set(safetensors_keys(tmp_path / d)) for d in ("ours", "theirs")]
    assert keys[0] == keys[1]
    back = adaptc.load_adapter(base, tmp_path / "theirs")
    close(logits(back, ids()), logits(peft_model, ids()))
    loaded = peft.PeftModel.from_pretrained(fresh_base(base), tmp_path / "ours").eval()
    close(logits(loaded, ids()), logits(model, ids()))


def safetensors_keys(folder: Any) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_bert_like_and_falcon_like_stacks_match_peft():
    torch.manual_seed(0)
    bert = tf.BertForSequenceClassification(
        tf.BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=32, vocab_size=64, num_labels=2)
    ).eval()  # fmt: skip
    gpt2 = tf.GPT2Model(tf.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64)).eval()
    cases = [
        (bert, "query", "bert.encoder.layer.3.attention.self.query"),
        (gpt2, "c_attn", "h.3.attn.c_attn"),
    ]
    for base, target, expected in cases:
        data = spec(
            targets={"kind": "names", "names": [target]}, layer_replication=[[0, 3], [1, 2]]
        )
        peft_model, model = build_pair(base, data)
        close(logits(model, ids()), logits(peft_model, ids()))
        assert expected in [t.path for t in compiled_info(model).plan.targets]
        assert model.config.num_hidden_layers == 4 and base.config.num_hidden_layers == 3


# --- merging -------------------------------------------------------------------------


def test_merge_gives_each_copy_its_own_weight_where_peft_adds_both_into_one():
    base = tiny_llama()
    peft_model, model = build_pair(base, spec())
    x = ids()
    with torch.no_grad():
        unmerged = logits(model, x)
        peft_unmerged = logits(peft_model, x)
        merged = adaptc.merge(model)
        gap = (logits(merged, x) - unmerged).abs().max().item()
        assert gap <= 1e-5
        assert len(merged.model.layers) == 5 and merged.config.num_hidden_layers == 5
        q1, q2 = (merged.model.layers[i].self_attn.q_proj for i in (1, 2))
        assert type(q1) is nn.Linear and not torch.equal(q1.weight, q2.weight)
        close(logits(model, x), unmerged)  # the unmerged model is still valid
        outputs = []
        for merge in (False, True):  # `merge: true` in the spec: compiled, then merged
            torch.manual_seed(5)
            outputs.append(logits(adaptc.compile(base, {**spec(init="random"), "merge": merge}), x))
        close(outputs[1], outputs[0], 1e-5)
        # peft writes both copies' deltas into the one weight they share
        peft_gap = (logits(peft_model.merge_and_unload(), x) - peft_unmerged).abs().max().item()
    assert peft_gap > 0.05, peft_gap  # measured: 0.20 with these weights


def test_merge_in_place_is_exact_per_copy():
    _, model = build_pair(tiny_llama(), spec())
    x = ids()
    with torch.no_grad():
        unmerged = logits(model, x)
        adaptc.merge_in_place(model)
        close(logits(model, x), unmerged, 1e-5)
        adaptc.unmerge_in_place(model)
        close(logits(model, x), unmerged, 0.0)


# --- files both ways -----------------------------------------------------------------


def fresh_base(base: nn.Module) -> nn.Module:
    fresh = tf.AutoModelForCausalLM.from_config(base.config).eval()
    fresh.load_state_dict(base.state_dict())
    return fresh


def test_adaptc_files_load_in_peft_which_replicates_a_fresh_base(tmp_path):
    base = tiny_llama()
    _, model = build_pair(base, spec())
    adaptc.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layer_replication"] == RANGES
    assert "base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight" in (
        safetensors_keys(tmp_path)
    )
    loaded = peft.PeftModel.from_pretrained(fresh_base(base), tmp_path).eval()
    close(logits(loaded, ids()), logits(model, ids()))


def test_peft_files_load_in_adaptc(tmp_path, capsys):
    base = tiny_llama()
    peft_model = peft.get_peft_model(fresh_base(base), peft_config(adaptc.load_spec(spec())))
    with_trained_b(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = adaptc.load_adapter(base, tmp_path, trainable=True)
    close(logits(model, ids()), logits(peft_model, ids()))
    assert compiled_info(model).spec.adapter().layer_replication == ((0, 2), (1, 4))
    assert counts_line(model, capsys) == counts_line(peft_model, capsys)


def test_the_facade_passes_layer_replication_through(capsys):
    from adaptc.peft import LoraConfig, get_peft_model

    base = tiny_llama()
    config = LoraConfig(r=4, target_modules=["q_proj"], layer_replication=RANGES)
    model = get_peft_model(base, config)
    assert len(model.base_model.model.model.layers) == 5 and len(base.model.layers) == 4
    theirs = peft.get_peft_model(fresh_base(base), peft.LoraConfig(
        r=4, target_modules=["q_proj"], layer_replication=RANGES))  # fmt: skip
    assert counts_line(model, capsys) == counts_line(theirs, capsys)


# --- plans ---------------------------------------------------------------------------


def test_plan_on_the_meta_device_counts_as_the_compiled_model():
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(llama_config())
    plan = adaptc.build_plan(meta, spec())
    assert all(p.is_meta for p in meta.parameters()) and len(meta.model.layers) == 4
    assert len(plan.targets) == 15  # 3 targets in each of 5 layers
    assert plan.targets[-1].path == "model.layers.4.mlp.down_proj"
    trainable, total = adaptc.trainable_parameters(adaptc.compile(tiny_llama(), spec()))
    assert (plan.trainable_params, plan.total_params) == (trainable, total)
    assert f"trainable {trainable:,} of {total:,}" in str(plan)


def test_layers_select_positions_of_the_new_stack():
    plan = adaptc.build_plan(tiny_llama(), spec(layers={"indices": [2, 4]}))
    assert [t.path for t in plan.targets] == [
        f"model.layers.{i}.{n}" for i in (2, 4)
        for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]  # fmt: skip


def test_per_layer_types_are_replicated_too():
    """Qwen2-like configs list a type per layer; peft leaves the list at 4 (its forward
    then fails with an IndexError), adaptc replicates it with the layers."""
    torch.manual_seed(0)
    base = tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2)).eval()  # fmt: skip
    model = adaptc.compile(base, spec(targets={"kind": "names", "names": ["q_proj"]}))
    assert model.config.layer_types == ["full_attention"] * 5
    assert len(base.config.layer_types) == 4
    assert model.generate(ids(1, 4), max_new_tokens=3, do_sample=False).shape == (1, 7)


# --- several adapters ----------------------------------------------------------------


def test_a_second_adapter_with_the_same_ranges_is_added_on_the_new_stack():
    model = adaptc.compile(tiny_llama(), spec())
    other = {"version": 1, "adapters": {"b": {"r": 2, "targets": TARGETS,
                                              "layer_replication": RANGES}}}  # fmt: skip
    assert adaptc.add_adapter(model, other) == ["b"]
    paths = [t.path for t in compiled_info(model).plan.targets if t.adapter == "b"]
    assert len(paths) == 15 and paths[-1] == "model.layers.4.mlp.down_proj"
    plain = {"version": 1, "adapters": {"c": {"targets": TARGETS}}}
    with pytest.raises(CompileError) as info:
        adaptc.add_adapter(model, plain)
    assert str(info.value) == (
        "adapter 'c': layer_replication must be the model's ([[0, 2], [1, 4]], not none): "
        "its adapters share its layers"
    )
    assert [a for a in compiled_info(model).spec.adapters] == ["default", "b"]


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([[2, 1]], "0: [2, 1) is empty: a range is [start, end) with start < end"),
        ([[0, 2], [1, 1]], "1: [1, 1) is empty: a range is [start, end) with start < end"),
        ([[-1, 2]], "0.0: must be ≥ 0, got -1"),
        ([[0, 1, 2]], "0: tuple should have at most 2 items after validation, not 3"),
        ([[0]], "0.1: missing required field"),
        ([[0.5, 2]], "0.0: expected an integer, got number 0.5"),
        ([], ": must have at least 1 item"),
    ],
)
def test_bad_ranges_are_refused_in_the_spec(ranges, message):
    with pytest.raises(SpecError) as info:
        adaptc.load_spec(spec(layer_replication=ranges))
    assert (
        str(info.value) == f"adapters.default.layer_replication{'.' * (message[0] != ':')}{message}"
    )


def test_overlapping_ranges_are_peft_s_own_example():
    """``[[0, 4], [2, 5]]`` (PEFT's docstring) overlaps: layers 2 and 3 run twice."""
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(llama_config(num_hidden_layers=5)).eval()
    peft_model, model = build_pair(base, spec(layer_replication=[[0, 4], [2, 5]]))
    assert model.config.num_hidden_layers == 7
    close(logits(model, ids()), logits(peft_model, ids()))


def test_a_range_past_the_last_layer_is_refused():
    with pytest.raises(CompileError) as info:
        adaptc.compile(tiny_llama(), spec(layer_replication=[[0, 2], [3, 5]]))
    assert str(info.value) == (
        "layer_replication: the range [3, 5) goes past the model's 4 layers (model.layers)"
    )


@pytest.mark.parametrize(
    "model", [DummyModel(), tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2))]
)
def test_a_model_without_a_layer_stack_is_refused_with_peft_s_message(model):
    """GPT-2's LM model keeps its layers under ``transformer.h``, which peft's rules do not
    look for (they find ``h`` only on the base ``GPT2Model``): peft refuses it as well."""
    targets = {"kind": "names", "names": ["linear" if isinstance(model, DummyModel) else "c_attn"]}
    with pytest.raises(CompileError) as info:
        adaptc.compile(model, spec(targets=targets))
    assert str(info.value) == NOT_FOUND
    with pytest.raises(ValueError, match="Could not locate the layers attribute"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            target_modules=targets["names"], layer_replication=RANGES))  # fmt: skip


def test_adapters_of_one_spec_must_replicate_alike():
    data = spec()
    data["adapters"]["b"] = {"targets": TARGETS, "layer_replication": [[0, 4]]}
    with pytest.raises(SpecError) as info:
        adaptc.load_spec(data)
    assert (
        "adapters.b.layer_replication: layer_replication must be the same in every adapter "
        "('default' has [[0, 2], [1, 4]], 'b' [[0, 4]]): they share the model's layers"
    ) in str(info.value)


def test_inits_that_rewrite_the_shared_base_weight_are_refused():
    with pytest.raises(SpecError) as info:
        adaptc.load_spec(spec(init="pissa"))
    assert (
        "layer_replication cannot be combined with init 'pissa': it rewrites the base "
        "weights, which the copies of a layer share"
    ) in str(info.value)


def test_peft_config_import_and_export():
    config = {"peft_type": "LORA", "target_modules": ["q_proj"], "layer_replication": RANGES}
    loaded = adaptc.load_spec(config)
    assert loaded.adapter().layer_replication == ((0, 2), (1, 4))
    assert loaded.to_peft_config()["layer_replication"] == RANGES
    assert adaptc.load_spec(spec()).to_dict()["adapters"]["default"]["layer_replication"] == (
        RANGES
    )


def test_a_merged_checkpoint_of_a_replicated_adapter_is_refused(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adaptc.save_adapter(adaptc.compile(base, spec()), tmp_path / "adapter")
    with pytest.raises(AdapterLoadError) as info:
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out",
                         build_meta_model=lambda s: base)  # fmt: skip
    assert str(info.value) == (
        "adapter 'default' replicates the model's layers (layer_replication [[0, 2], [1, 4]]): "
        "a merged checkpoint of the new stack is not written yet; adaptc.merge() merges it in "
        "memory"
    )
    assert not (tmp_path / "out").exists()
