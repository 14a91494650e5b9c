"""The facade's ``add_adapter`` adds in place, as PEFT's does: an optimizer keeps working."""

from __future__ import annotations

import pytest
import torch

import adaptc.peft as ap
from tests.compiler.models import tiny_hf

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def batch(n, seq=6):
    return torch.randint(1, 64, (n, seq), generator=torch.Generator().manual_seed(3))


def test_add_adapter_keeps_existing_parameters_and_a_duplicate_is_peft_s_error():
    model = ap.get_peft_model(tiny_hf("llama"), ap.LoraConfig(r=4, target_modules=TARGETS))
    before = {n: p for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.add_adapter("second", ap.LoraConfig(r=2, target_modules=TARGETS[:1]))
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())  # the optimizer still holds them
    assert any(".lora_second." in n for n in after)
    model(input_ids=batch(2)).logits.sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"^Adapter with name 'second' already exists\.$"):
        model.add_adapter("second", ap.LoraConfig(target_modules=TARGETS))


def test_load_adapter_adds_in_place_and_matches_peft(tmp_path):
    import copy

    import peft

    base = tiny_hf("llama").eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS))
    for p in theirs.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    theirs.save_pretrained(tmp_path / "saved")
    ours = ap.get_peft_model(base, ap.LoraConfig(r=2, target_modules=TARGETS[:1]))
    before = {id(p) for p in ours.parameters()}
    ours.load_adapter(tmp_path / "saved", adapter_name="loaded")
    after = dict(ours.named_parameters())
    assert before <= {id(p) for p in after.values()}  # (a newly wrapped layer's names move)
    assert not any(p.requires_grad for n, p in after.items() if ".lora_loaded." in n)
    assert ours.peft_config["loaded"].r == 4 and ours.peft_config["loaded"].inference_mode
    ours.set_adapter("loaded")
    x = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=x).logits, theirs.eval()(input_ids=x).logits, rtol=1e-6, atol=1e-6
        )
