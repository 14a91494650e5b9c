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
