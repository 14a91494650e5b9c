"""bf16 bases with fp32 adapter weights, with and without ``torch.autocast``.

adaptc makes adapter weights fp32 on a half-precision base (PEFT's
``autocast_adapter_dtype``) and emits casts around the branch. Outputs and adapter
gradients match PEFT's on the same bf16 model with the same adapter weights.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import adaptc
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import (
    adapter_grads,
    build_pair,
    output_tensor,
    peft_grads,
)

FAMILY_TARGETS = {
    "llama": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "opt": ["q_proj", "v_proj", "fc1"],
    "gpt2": ["c_attn", "c_proj"],
}
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-2}
OPTIONS = [
    ("plain", {"r": 4, "lora_alpha": 8}),
    ("dora", {"r": 4, "lora_alpha": 8, "use_dora": True}),
]


def _spec(family: str, fields: dict) -> dict:
    targets = {"kind": "names", "names": FAMILY_TARGETS[family]}
    return {"version": 1, "adapters": {"default": {"targets": targets, **fields}}}


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("option,fields", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_bf16_base_matches_peft(family, option, fields, autocast):
    base = tiny_hf(family).to(torch.bfloat16)
    peft_model, compiled = build_pair(base, _spec(family, fields))
    trainable = [p for p in compiled.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    peft_model.eval()
    compiled.eval()
    inputs = hf_inputs(family)
    with _autocast(autocast):
        ours = output_tensor(compiled(**inputs))
        theirs = output_tensor(peft_model(**inputs))
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, **BF16_TOL)
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    grads = adapter_grads(compiled)
    for key, expected in peft_grads(peft_model, grads).items():
        assert grads[key].dtype == torch.float32
        assert torch.isfinite(grads[key]).all() and grads[key].abs().sum() > 0, key
        torch.testing.assert_close(grads[key], expected, **BF16_TOL, msg=str(key))


def test_fp32_base_under_bf16_autocast_matches_peft():
    base = tiny_hf("llama")
    peft_model, compiled = build_pair(base, _spec("llama", {"r": 4, "lora_alpha": 8}))
    peft_model.eval()
    compiled.eval()
    inputs = hf_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = output_tensor(compiled(**inputs))
        theirs = output_tensor(peft_model(**inputs))
    torch.testing.assert_close(ours, theirs, **BF16_TOL)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_bf16_training_steps_lower_the_loss(autocast):
    base = tiny_hf("llama").to(torch.bfloat16)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    model = adaptc.compile(base, _spec("llama", {"r": 8, "lora_alpha": 16}))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    inputs = hf_inputs("llama")
    losses = []
    for _ in range(5):
        with _autocast(autocast):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in trainable)
    for key, value in base.state_dict().items():  # shared base weights never moved
        assert torch.equal(value, frozen[key]), key
