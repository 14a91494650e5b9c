"""adaptc.quantize (a base loaded as ``base_model.quantization`` says; its size on the meta
device) and merging a quantized base: dequantized (exact, any dtype) or requantized
(peft's lossy merge, byte for byte, with the error reported)."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc
from adaptc.quantize import from_pretrained_kwargs, quantized_bytes, quantized_layers, roundtrip
from adaptc.spec.quantization import BitsAndBytesQuantization, TorchaoQuantization
from tests.compiler.models import save_llama

bnb = pytest.importorskip("bitsandbytes")

FOUR = BitsAndBytesQuantization(method="bitsandbytes", bits=4, quant_type="nf4", double_quant=True)
EIGHT = BitsAndBytesQuantization(method="bitsandbytes", bits=8)
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3]])
CONFIG = {"r": 4, "target_modules": ["q_proj", "down_proj"], "init_lora_weights": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama"))


def load(path: Path, q: BitsAndBytesQuantization) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs(q)).eval()


def _bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for p in model.parameters():
        if getattr(p, "SCB", None) is not None:  # 8-bit: one scale per row
            tensors[id(p.SCB)] = p.SCB
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors[id(state.absmax)] = state.absmax
            if state.nested:
                tensors[id(state.state2.absmax)] = state.state2.absmax
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("q", [FOUR, EIGHT], ids=["4bit", "8bit"])
def test_the_meta_estimate_is_what_loading_holds(checkpoint, q):
    real = load(checkpoint, q)
    with torch.device("meta"):
        twin = tf.LlamaForCausalLM(real.config)
    assert len(quantized_layers(twin, q)) == 7  # every linear layer but lm_head
    estimate = quantized_bytes(twin, q, torch.float32)
    assert estimate == pytest.approx(_bytes(real), rel=0.01)


@pytest.mark.parametrize("q", [FOUR, EIGHT], ids=["4bit", "8bit"])
def test_roundtrip_is_the_loaded_layers_weight(checkpoint, q):
    float_weight = (
        tf.AutoModelForCausalLM.from_pretrained(checkpoint).model.layers[0].mlp.up_proj.weight
    )
    layer = load(checkpoint, q).model.layers[0].mlp.up_proj
    kind = adaptc.layers.kind_of(layer)
    torch.testing.assert_close(
        roundtrip(float_weight.detach(), q), kind.weight(layer), rtol=0, atol=0
    )


@pytest.mark.parametrize("q", [FOUR, EIGHT], ids=["4bit", "8bit"])
def test_a_requantized_merge_is_peft_merge_byte_for_byte(checkpoint, tmp_path, q):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load(checkpoint, q), peft.LoraConfig(**CONFIG))
    theirs.save_pretrained(tmp_path)
    mine = adaptc.load_adapter(load(checkpoint, q), tmp_path)
    errors: dict[str, float] = {}
    with pytest.warns(adaptc.AdaptcWarning, match="requantized 2 merged layer"):
        ours = adaptc.merge(mine, quantized="requantize", errors=errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = theirs.merge_and_unload()
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        layer, expected = ours.get_submodule(path), reference.get_submodule(path)
        assert type(layer) is type(expected)
        torch.testing.assert_close(layer.weight.data, expected.weight.data, rtol=0, atol=0)
        assert 0 < errors[path] < 0.1
    assert sorted(errors) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]


def test_a_dequantized_merge_takes_a_dtype_and_the_spec_decides_the_default(checkpoint):
    spec = {"version": 1, "adapters": {"default": {
        "init": "random", "targets": {"kind": "names", "names": ["q_proj"]}}}}  # fmt: skip
    model = adaptc.compile(load(checkpoint, FOUR), spec)
    merged = adaptc.merge(model, dtype=torch.bfloat16)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert type(merged.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"  # untouched
    declared = {**spec, "base_model": {"name": "x", "quantization": {
        "method": "bitsandbytes", "bits": 4, "merge": "requantize"}}}  # fmt: skip
    model = adaptc.compile(load(checkpoint, FOUR), declared)
    with pytest.warns(adaptc.AdaptcWarning, match="requantized 1 merged layer"):
        merged = adaptc.merge(model)
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_quantize_loaded_quantizes_all_linear_but_the_head(checkpoint):
    pytest.importorskip("torchao")
    from adaptc.quantize import quantize_loaded

    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint)
    quantize_loaded(model, TorchaoQuantization(method="torchao", scheme="int8_weight_only"))
    kinds = {adaptc.layers.kind_of(m).name for n, m in model.named_modules() if n.endswith("proj")}
    assert kinds == {"torchao.Linear"}
    assert adaptc.layers.kind_of(model.lm_head).name == "nn.Linear"


def test_a_missing_backend_is_one_line(monkeypatch):
    import importlib.util

    from adaptc.quantize import QuantizationError

    real = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name == "bitsandbytes" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(QuantizationError, match=r"needs the package bitsandbytes \(pip install"):
        from_pretrained_kwargs(FOUR)
