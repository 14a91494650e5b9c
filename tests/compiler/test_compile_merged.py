"""A merged model compiles again: its traced graphs (a merged MLP is an fx graph module)
keep their generated forward when the compiler copies them."""

from __future__ import annotations

import torch

import adaptc
from tests.compiler.models import NestedMLP, hf_inputs, tiny_hf


def _lora(*names: str) -> dict:
    return {"version": 1, "adapters": {"second": {
        "init": "random", "r": 4, "targets": {"kind": "names", "names": list(names)}}}}  # fmt: skip


def test_a_merged_hf_model_compiles_again():
    model = tiny_hf("llama").eval()
    first = {"version": 1, "adapters": {"default": {"init": "random", "r": 4,
             "targets": {"kind": "names", "names": ["down_proj", "q_proj"]}}}}  # fmt: skip
    merged = adaptc.merge(adaptc.compile(model, first)).eval()
    again = adaptc.compile(merged, _lora("down_proj", "up_proj")).eval()
    x = hf_inputs("llama")
    with torch.no_grad():
        with adaptc.disabled(again):
            torch.testing.assert_close(again(**x).logits, merged(**x).logits)
        out = again(**x).logits
        assert not torch.allclose(out, merged(**x).logits)
        torch.testing.assert_close(adaptc.merge(again)(**x).logits, out, rtol=1e-5, atol=1e-5)


def test_a_merged_traced_model_compiles_again():
    torch.manual_seed(0)
    model = NestedMLP().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    merged = adaptc.merge(adaptc.compile(model, _lora(*names))).eval()
    again = adaptc.compile(merged, _lora(*names)).eval()
    x = torch.randn(3, next(model.parameters()).shape[1])
    with torch.no_grad():
        with adaptc.disabled(again):
            torch.testing.assert_close(again(x), merged(x))
        torch.testing.assert_close(adaptc.merge(again)(x), again(x), rtol=1e-5, atol=1e-5)
