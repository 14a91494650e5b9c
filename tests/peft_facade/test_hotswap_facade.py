"""``adaptc.peft.hotswap``: PEFT's hotswap workflow on the facade, against the real ``peft``."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch._dynamo
from peft.utils import hotswap as peft_hotswap
from torch import nn
from torch._dynamo.testing import CompileCounter

import adaptc.peft as ap
from adaptc.peft.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _save(base: nn.Module, directory: Path, seed: int, **kwargs: object) -> str:
    """A 'trained' PEFT adapter (random B), written by the real peft."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], **kwargs)  # type: ignore[arg-type]
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(directory))
    return str(directory)


def test_facade_hotswap_matches_peft_without_recompiling(tmp_path):
    base = tiny_hf("opt").eval()
    x = hf_inputs("opt")
    first = _save(base, tmp_path / "a", seed=1, r=2, lora_alpha=4)
    second = _save(base, tmp_path / "b", seed=2, r=8, lora_alpha=24)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), first).eval()
    peft_hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=8)
    peft_hotswap.hotswap_adapter(theirs, second, adapter_name="default", torch_device="cpu")

    ours = ap.PeftModel.from_pretrained(base, first).eval()
    config = ours.peft_config
    prepare_model_for_compiled_hotswap(ours, target_rank=8, config=config)
    assert config["default"].r == 8  # as PEFT rewrites the configs passed in
    counter = CompileCounter()
    compiled = torch.compile(ours, backend=counter)
    with torch.no_grad():
        compiled(**x)
        frames = counter.frame_count
        hotswap_adapter(compiled, second, adapter_name="default", torch_device="cpu")
        out = output_tensor(compiled(**x))
        expected = output_tensor(theirs(**x))
        fresh = output_tensor(ap.PeftModel.from_pretrained(base, second).eval()(**x))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, fresh, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == frames
    swapped = ours.peft_config["default"]
    assert (swapped.r, swapped.lora_alpha, swapped.inference_mode) == (8, 24, True)


def test_facade_prepare_refuses_a_compiled_model(tmp_path):
    base = tiny_hf("opt")
    ours = ap.PeftModel.from_pretrained(base, _save(base, tmp_path / "a", seed=1))
    compiled = torch.compile(ours, backend="eager")
    with pytest.raises(ValueError, match=r"Call prepare_model_for_compiled_hotswap \*before\*"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")


def test_facade_hotswap_refuses_unknown_arguments(tmp_path):
    base = tiny_hf("opt")
    first = _save(base, tmp_path / "a", seed=1)
    ours = ap.PeftModel.from_pretrained(base, first)
    with pytest.raises(ap.NotSupportedError, match="weights_only=True is not supported"):
        hotswap_adapter(ours, first, "default", weights_only=True)
