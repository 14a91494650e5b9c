"""IA3 on bitsandbytes 8-bit and 4-bit layers against peft 0.21.2 (peft/tuners/ia3/bnb.py)
on the same quantized base: outputs, gradients, counts, files; bfloat16, where peft's
layers leave float32 outputs that break the model, keeps the model's dtype."""

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
from tests.compiler.models import save_llama

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3]])
CONFIG = {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"],
          "init_ia3_weights": False}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama"), hidden=64)


def load(path: Path, bits: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = (
        tf.BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu", dtype=dtype
        ).eval()


def run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits without grad, the trained vectors' gradients)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(IDS).logits
        model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(IDS).logits.float().square().mean().backward()
    named = sorted(model.named_parameters())
    return out, torch.cat([p.grad.flatten() for _, p in named if p.grad is not None])


@pytest.mark.parametrize("bits", [8, 4])
def test_ia3_equals_peft(checkpoint, tmp_path, bits):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load(checkpoint, bits), peft.IA3Config(**CONFIG))
    theirs.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(1)
    fresh = ap.get_peft_model(load(checkpoint, bits), ap.IA3Config(**CONFIG))
    assert fresh.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    fresh.save_pretrained(tmp_path / "ours")  # the same draw as peft's, in peft's files
    mine = ap.PeftModel.from_pretrained(
        load(checkpoint, bits), tmp_path / "theirs", is_trainable=True
    )
    (out, grads), (expected, expected_grads) = run(mine), run(theirs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-5, atol=1e-7)
    again = peft.PeftModel.from_pretrained(load(checkpoint, bits), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, rtol=1e-5, atol=1e-6)
    layer = mine.get_base_model().model.layers[0].mlp.down_proj
    base = getattr(layer, "base_layer", layer)
    vector = next(p for n, p in layer.named_parameters() if n.endswith("ia3_l"))  # (1, in)
    expected_weight = adaptc.layers.kind_of(base).weight(base) * vector
    merged = mine.merge_and_unload().model.layers[0].mlp.down_proj
    assert type(merged) is nn.Linear  # dequantized, its input features scaled
    torch.testing.assert_close(merged.weight, expected_weight, rtol=1e-6, atol=1e-7)


def test_bfloat16_keeps_the_models_dtype_where_peft_breaks(checkpoint):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load(checkpoint, 4, torch.bfloat16), peft.IA3Config(**CONFIG))
    with pytest.raises(RuntimeError, match="same dtype"), torch.no_grad():
        theirs(IDS)  # q_proj returns float32 to a bfloat16 attention
    mine = ap.get_peft_model(load(checkpoint, 4, torch.bfloat16), ap.IA3Config(**CONFIG))
    out, grads = run(mine)
    assert out.dtype == torch.bfloat16 and grads.abs().sum() > 0
