"""``adapter_names`` in the facade's forward and generate: PEFT's mixed-adapter batches."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import adaptc.peft as ap
from tests.compiler.models import tiny_hf
from tests.compiler.parity import share_adapter_weights

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def pair():
    """PEFT and the facade with two adapters (different ranks) holding the same weights."""
    base = tiny_hf("llama").eval()
    models = []
    for lib in (peft, ap):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=8, target_modules=TARGETS))
        model.add_adapter("other", lib.LoraConfig(r=4, lora_alpha=3, target_modules=TARGETS[:2]))
        models.append(model.eval())
    theirs, ours = models
    share_adapter_weights(theirs, ours.get_base_model())
    return theirs, ours


def batch(n, seq=6):
    return torch.randint(1, 64, (n, seq), generator=torch.Generator().manual_seed(3))


def test_forward_with_adapter_names_matches_peft():
    theirs, ours = pair()
    names = ["other", "__base__", "default", "other"]
    x = batch(len(names))
    with torch.no_grad():
        expected = theirs(input_ids=x, adapter_names=names).logits
        got = ours(input_ids=x, adapter_names=names).logits
        plain = ours(input_ids=x).logits  # afterwards: the active adapter again
        plain_theirs = theirs(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, plain_theirs, rtol=1e-5, atol=1e-5)


def test_generate_with_adapter_names_and_beams_matches_peft():
    theirs, ours = pair()
    names = ["default", "__base__", "other"]
    x = batch(len(names), seq=4)
    settings = {"max_new_tokens": 5, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    expected = theirs.generate(input_ids=x, adapter_names=names, **settings)
    got = ours.generate(input_ids=x, adapter_names=names, **settings)
    assert torch.equal(got, expected)


def test_task_model_forward_takes_adapter_names():
    base = tiny_hf("llama").eval()
    config = ap.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM")
    ours = ap.get_peft_model(base, config).eval()
    assert isinstance(ours, ap.PeftModelForCausalLM)
    x = batch(2)
    with torch.no_grad():
        mixed = ours(input_ids=x, adapter_names=["default", "__base__"]).logits
        with ours.disable_adapter():
            torch.testing.assert_close(
                mixed[1:], ours(input_ids=x[1:]).logits, rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("lib", [peft, ap], ids=["peft", "adaptc"])
def test_errors_are_peft_s(lib):
    model = lib.get_peft_model(tiny_hf("llama"), lib.LoraConfig(target_modules=TARGETS))
    x = batch(2)
    model.train()
    with pytest.raises(
        ValueError, match="Cannot pass `adapter_names` when the model is in training"
    ):
        model(input_ids=x, adapter_names=["default", "default"])
    model.eval()
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope"):
        model(input_ids=x, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(input_ids=x, adapter_names=["default"])
