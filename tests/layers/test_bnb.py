"""LoRA on bitsandbytes' 8-bit linear layers (a tiny Llama loaded with
``BitsAndBytesConfig(load_in_8bit=True)`` on the CPU) against peft 0.21.2 on the same
quantized base: outputs, LoRA gradients, counts, files both ways, the user's layers
untouched, and the dequantized merge."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc
import adaptc.peft as ap
from tests.compiler.models import hf_inputs, tiny_hf

bnb = pytest.importorskip("bitsandbytes")

TOL = {"rtol": 1e-5, "atol": 1e-6}
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
          "init_lora_weights": False}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    tiny_hf("llama").save_pretrained(path)
    return path


def load_8bit(path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = tf.BitsAndBytesConfig(load_in_8bit=True)
        return tf.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu"
        ).eval()


@pytest.fixture
def pair(checkpoint, tmp_path):
    """(adaptc's base, peft's model, adaptc's model) with the same adapter weights."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load_8bit(checkpoint), peft.LoraConfig(**CONFIG))
    theirs.save_pretrained(tmp_path / "adapter")
    base = load_8bit(checkpoint)
    mine = ap.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    return base, theirs, mine


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**hf_inputs("llama")).logits


def test_the_8bit_layers_are_their_own_kind(checkpoint):
    base = load_8bit(checkpoint)
    layer = base.model.layers[0].self_attn.q_proj
    assert adaptc.layers.kind_of(layer).name == "bnb.Linear8bitLt"


def test_outputs_gradients_and_counts_equal_peft(pair):
    _, theirs, mine = pair
    torch.testing.assert_close(logits(mine), logits(theirs), **TOL)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    grads = []
    for model in (theirs, mine):
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**hf_inputs("llama")).logits.square().mean().backward()
        grads.append(sorted(p.grad.norm().item() for p in model.parameters() if p.grad is not None))
    assert len(grads[0]) == len(grads[1]) == 12
    assert grads[1] == pytest.approx(grads[0], rel=1e-4)


def test_files_both_ways(pair, checkpoint, tmp_path):
    _, theirs, mine = pair
    mine.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(load_8bit(checkpoint), tmp_path / "ours")
    torch.testing.assert_close(logits(again), logits(theirs), **TOL)


def test_the_users_layers_are_untouched(checkpoint, tmp_path):
    base = load_8bit(checkpoint)
    layer = base.model.layers[0].self_attn.q_proj
    data, scb = layer.weight.data.clone(), layer.weight.SCB.clone()
    model = adaptc.compile(base, {"version": 1, "adapters": {"default": {
        "r": 4, "targets": {"kind": "names", "names": ["q_proj"]}}}})  # fmt: skip
    logits(model)  # the copy's forward moves CB/SCB into *its* matmul state
    assert layer.weight.CB is not None and layer.state.CB is None  # the user's: as loaded
    assert torch.equal(layer.weight.data, data) and torch.equal(layer.weight.SCB, scb)
    ours = model.model.layers[0].self_attn.q_proj
    ours = getattr(ours, "base_layer", ours)
    assert ours.weight.data_ptr() == layer.weight.data_ptr()  # shared, not copied
    assert ours.state is not layer.state


def test_merge_dequantizes(pair):
    _, _, mine = pair
    merged = mine.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
    original = mine.get_base_model().model.layers[0].self_attn.q_proj
    original = getattr(original, "base_layer", original)
    branch = next(m for m in original.children() if hasattr(m, "lora_A"))
    W = bnb.functional.int8_vectorwise_dequant(original.weight.data, original.weight.SCB)
    expected = W + branch.scaling * branch.lora_B.weight @ branch.lora_A.weight
    torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=1e-6)


def test_merging_in_place_is_refused_and_changes_nothing(pair):
    _, _, mine = pair
    before = logits(mine)
    with pytest.raises(ValueError, match="cannot be merged in place"):
        mine.merge_adapter()
    torch.testing.assert_close(logits(mine), before, rtol=0, atol=0)


def test_base_inits_are_refused(checkpoint):
    spec = {"version": 1, "adapters": {"default": {
        "targets": {"kind": "names", "names": ["q_proj"]}, "init": "pissa"}}}  # fmt: skip
    with pytest.raises(adaptc.CompileError, match=r"not available on bnb\.Linear8bitLt"):
        adaptc.compile(load_8bit(checkpoint), spec)


def test_dora_equals_peft_and_runs_where_peft_breaks(checkpoint, tmp_path):
    """peft's DoRA on 8-bit layers fails at its second forward (the layer's scales have
    moved into its matmul state); adaptc's reads the layer's weight as its kind does."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load_8bit(checkpoint), peft.LoraConfig(**CONFIG, use_dora=True))
    theirs.save_pretrained(tmp_path / "dora")
    mine = ap.PeftModel.from_pretrained(load_8bit(checkpoint), tmp_path / "dora", is_trainable=True)
    first = logits(mine)
    torch.testing.assert_close(first, logits(theirs), **TOL)
    with pytest.raises(AttributeError, match="dtype"):
        logits(theirs)
    torch.testing.assert_close(logits(mine), first, rtol=0, atol=0)
    fresh = peft.PeftModel.from_pretrained(
        load_8bit(checkpoint), tmp_path / "dora", is_trainable=True
    )
    grads = []
    for model in (fresh, mine):
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**hf_inputs("llama")).logits.square().mean().backward()
        grads.append(sorted(p.grad.norm().item() for p in model.parameters() if p.grad is not None))
    assert len(grads[1]) == 18 and grads[1] == pytest.approx(grads[0], rel=1e-4)
    merged = mine.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear


def test_all_linear_selects_what_peft_selects(checkpoint):
    config = {"target_modules": "all-linear"}
    names = []
    for lib in (peft, ap):
        model = lib.get_peft_model(load_8bit(checkpoint), lib.LoraConfig(**config))
        names.append(sorted(model.targeted_module_names))
    assert names[1] == names[0] and len(names[0]) == 14  # 7 per layer, not lm_head
