"""The training passes (spec ``compile:``): each exact against the unoptimised graph, and
each keeping less for backward.

- dropout (``regenerate``, ``mask``): logits, every gradient and the random stream after
  the step bit for bit those of ``dropout: save`` (and within parity of peft's, drawing
  the same masks); the mask has dropout's statistics;
- rematerialize: bit for bit; the MLP's intermediates are not kept;
- fuse_siblings: outputs bit for bit, gradients within parity; the state dict unchanged;
- fuse_add: unmerged inference bit for bit (scaling moved onto ``a``), or within parity.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import adaptc
from adaptc.compiler.dropout import dropout_linear
from adaptc.compiler.memory import held_bytes
from adaptc.compiler.remat import PREFIX
from tests.compiler.models import hf_inputs, tiny_hf

OFF = {"dropout": "save", "rematerialize": False, "fuse_siblings": False, "fuse_add": False}
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _spec(dropout: float, options: dict | None = None) -> dict:
    adapter = {"r": 4, "lora_alpha": 8, "lora_dropout": dropout, "init": "random",
               "targets": {"kind": "names", "names": TARGETS}}  # fmt: skip
    data = {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": adapter}}
    return data if options is None else {**data, "compile": options}


def _step(
    model: nn.Module, seed: int = 5
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(logits, gradients, the next random draw) of one training forward and backward."""
    model.train()
    x = hf_inputs("llama")
    torch.manual_seed(seed)
    out = model(**x, labels=x["input_ids"])
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads, torch.rand(4)


def _pair(dropout: float, options: dict) -> tuple[nn.Module, nn.Module]:
    base = tiny_hf("llama")
    plain = adaptc.compile(base, _spec(dropout, OFF))
    fast = adaptc.compile(base, _spec(dropout, options))
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("mode", ["regenerate", "mask"])
def test_dropout_without_saved_copies_is_bit_exact(mode):
    plain, fast = _pair(0.3, {**OFF, "dropout": mode})
    assert "dropout_linear" in fast.model.layers[0].mlp.code
    logits, grads, after = _step(plain)
    logits2, grads2, after2 = _step(fast)
    assert torch.equal(logits, logits2)
    assert grads.keys() == grads2.keys()
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    assert torch.equal(after, after2)  # backward drew nothing: the stream goes on alike


def test_dropout_draws_peft_s_masks():
    from tests.compiler.parity import adapter_grads, build_pair, peft_grads

    theirs, ours = build_pair(tiny_hf("llama"), _spec(0.3))
    (logits, _, after), (logits2, _, after2) = _step(ours), _step(theirs)
    torch.testing.assert_close(logits, logits2, rtol=1e-5, atol=1e-6)
    grads = adapter_grads(ours)
    for key, grad in peft_grads(theirs, grads).items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, after2)


@pytest.mark.parametrize("mode", ["regenerate", "mask"])
def test_the_regenerated_mask_has_dropout_s_statistics(mode):
    p = 0.3
    drop, linear = nn.Dropout(p), nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(64))
    x = torch.ones(256, 64, requires_grad=True)
    torch.manual_seed(0)
    y = dropout_linear(x, drop, linear, mode)
    y.backward(torch.ones_like(y))
    kept = y != 0  # y = dropout(x): the forward's mask
    assert abs(1 - kept.float().mean().item() - p) < 0.02
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert torch.equal(x.grad, y.detach())  # backward used the forward's mask, scaled alike


def test_dropout_linear_runs_the_modules_when_hooked():
    drop, linear = nn.Dropout(0.5), nn.Linear(8, 4, bias=False)
    calls = []
    linear.register_forward_pre_hook(lambda m, args: calls.append(1))
    dropout_linear(torch.randn(3, 8, requires_grad=True), drop, linear)
    assert calls == [1]  # a hook (ZeRO-3 gathering the weight) still runs


def test_rematerialize_is_bit_exact_and_keeps_less():
    plain, fast = _pair(0.0, {**OFF, "rematerialize": True})
    mlp = fast.model.layers[0].mlp
    assert f"self.{PREFIX}0(" in mlp.code and "silu" not in mlp.code
    logits, grads, _ = _step(plain)
    logits2, grads2, _ = _step(fast)
    assert torch.equal(logits, logits2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    x = torch.randn(2, 7, 16, requires_grad=True)
    held = {}
    for who, model in (("plain", plain), ("fast", fast)):
        block = model.model.layers[0].mlp
        held[who], out = held_bytes(lambda b=block: b(x), list(block.parameters()))
        del out
    one = 2 * 7 * 32 * 4  # one intermediate-size float32 tensor
    # gate, silu(gate), up, product (and the output) against gate and up (and the output)
    assert held["plain"] - held["fast"] == 2 * one


def test_rematerialize_steps_aside_under_an_outer_saved_tensor_hook():
    plain, fast = _pair(0.0, {**OFF, "rematerialize": True})
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        logits, grads, _ = _step(fast)
    logits2, grads2, _ = _step(plain)
    assert torch.equal(logits, logits2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name


def test_fuse_siblings_keeps_the_state_dict_and_parity():
    plain, fast = _pair(0.0, {**OFF, "fuse_siblings": True})
    code = fast.model.layers[0].mlp.code
    assert code.count("fused_linear(") == 1  # gate_proj and up_proj read one x
    assert plain.state_dict().keys() == fast.state_dict().keys()
    logits, grads, _ = _step(plain)
    logits2, grads2, _ = _step(fast)
    assert torch.equal(logits, logits2)
    for name in grads:
        torch.testing.assert_close(grads[name], grads2[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lora_alpha", [8, 6])  # scaling 2 (moved onto a), 1.5 (alpha=s)
def test_fuse_add_in_unmerged_inference(lora_alpha):
    base = tiny_hf("llama")
    data = _spec(0.0, OFF)
    data["adapters"]["default"]["lora_alpha"] = lora_alpha
    plain = adaptc.compile(base, data).eval()
    fast = adaptc.compile(base, {**data, "compile": {**OFF, "fuse_add": True}}).eval()
    fast.load_state_dict(plain.state_dict())
    assert "lora_add(" in fast.model.layers[0].mlp.code
    x = hf_inputs("llama")
    with torch.no_grad():
        ours, theirs = fast(**x).logits, plain(**x).logits
    if lora_alpha == 8:
        assert torch.equal(ours, theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    logits, grads, _ = _step(plain)  # with gradients: the unoptimised operations
    logits2, grads2, _ = _step(fast)
    assert torch.equal(logits, logits2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name


def test_all_passes_with_dropout_save_merge_and_switch(tmp_path):
    base = tiny_hf("llama")
    model = adaptc.compile(base, _spec(0.1))
    assert any(n.startswith(PREFIX) for n in model.model.layers[0].mlp._modules)
    _step(model)
    adaptc.save_adapter(model, tmp_path)
    loaded = adaptc.load_adapter(base, tmp_path)
    x = hf_inputs("llama")
    merged = adaptc.merge(loaded).eval()
    assert not any(n.startswith(PREFIX) for n, _ in merged.named_modules())
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, loaded(**x).logits, rtol=1e-5, atol=1e-6)
        with adaptc.disabled(loaded):  # no branch: no region either
            assert not any(n.startswith(PREFIX) for n in loaded.model.layers[0].mlp._modules)
            torch.testing.assert_close(loaded(**x).logits, base.eval()(**x).logits)


def test_optimised_models_copy_and_pickle():
    plain, fast = _pair(0.1, {})
    logits, grads, _ = _step(plain)
    for again in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert "dropout_linear(" in again.model.layers[0].mlp.code
        logits2, grads2, _ = _step(again)
        assert torch.equal(logits, logits2)
        for name in grads:  # fused siblings: within parity
            torch.testing.assert_close(grads[name], grads2[name], rtol=1e-5, atol=1e-7)


def test_a_bad_option_is_named():
    with pytest.raises(adaptc.SpecError, match=r"compile\.dropout"):
        adaptc.load_spec(_spec(0.1, {"dropout": "sometimes"}))
