"""Compiled models under ``torch.compile``: training, inference, switching adapters.

A fully traced custom model is one ``GraphModule`` and compiles with ``fullgraph=True``;
on transformers models the adapter nodes add no graph break to what the base model has.
Switching train/eval, disabling the adapter or choosing another one makes dynamo
recompile (each graph's code lives on a class of its own, which dynamo guards), never run
a stale graph; switching back reuses the earlier compilation.

Most tests use the ``aot_eager`` backend (dynamo + AOT autograd, no code generation) to
stay fast on CPU; one test runs inductor, the default backend, end to end.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch._dynamo
from torch import fx, nn
from torch._dynamo.testing import CompileCounter

import adaptc
from tests.compiler.models import DummyModel, NestedMLP, hf_inputs, tiny_hf
from tests.compiler.parity import adapter_grads, output_tensor

FAMILY_TARGETS = {
    "llama": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "opt": ["q_proj", "v_proj", "fc1"],
    "gpt2": ["c_attn", "c_proj"],
}
CUSTOM = {
    "nested-mlp": (NestedMLP, lambda: (torch.randn(2, 12),), ["fc1", "fc2", "head"]),
    "dummy": (DummyModel, lambda: (torch.randint(0, 10, (2, 5)),), ["linear", "lm_head"]),
}
TOL = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _spec(names: list[str], **fields) -> dict:
    adapter = {"r": 4, "lora_alpha": 8, "targets": {"kind": "names", "names": names}, **fields}
    return {"version": 1, "adapters": {"default": adapter}}


def _randomise_b(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-zero B: the adapter changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _custom(name: str) -> tuple[nn.Module, nn.Module, tuple]:
    cls, make_inputs, names = CUSTOM[name]
    torch.manual_seed(0)
    base = cls()
    return base, _randomise_b(adaptc.compile(base, _spec(names))), make_inputs()


def _hf(family: str, spec: dict | None = None) -> tuple[nn.Module, nn.Module]:
    base = tiny_hf(family)
    torch.manual_seed(1)
    return base, _randomise_b(adaptc.compile(base, spec or _spec(FAMILY_TARGETS[family])))


@pytest.mark.parametrize("name", list(CUSTOM))
def test_fully_traced_model_compiles_fullgraph(name):
    _, model, inputs = _custom(name)
    assert isinstance(model, fx.GraphModule)  # one graph, the adapter nodes inside
    model.train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    expected = eager(*inputs)
    torch.testing.assert_close(out, expected, **TOL)
    out.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    grads, want = adapter_grads(model), adapter_grads(eager)
    for key, g in grads.items():
        torch.testing.assert_close(g, want[key], **TOL, msg=str(key))


def test_inductor_trains_and_infers_fullgraph():
    _, model, inputs = _custom("dummy")
    compiled = torch.compile(model, fullgraph=True)  # the default backend: inductor
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    losses = []
    for _ in range(3):
        loss = compiled(*inputs).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), **TOL)


def test_fullgraph_model_switches_adapters():
    base, model, inputs = _custom("nested-mlp")
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        adapted = compiled(*inputs)
        torch.testing.assert_close(adapted, model(*inputs), **TOL)
        with adaptc.disabled(model):
            torch.testing.assert_close(compiled(*inputs), base(*inputs), **TOL)
        torch.testing.assert_close(compiled(*inputs), adapted, **TOL)
    assert not torch.allclose(adapted, base(*inputs), atol=1e-4)


def _breaks(model: nn.Module, inputs: dict) -> int:
    torch._dynamo.reset()
    count = torch._dynamo.explain(model)(**inputs).graph_break_count
    torch._dynamo.reset()
    return count


@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_adapter_adds_no_graph_break(family):
    base, model = _hf(family)
    base.eval()
    model.eval()
    inputs = hf_inputs(family)
    assert _breaks(model, inputs) <= _breaks(base, inputs)


def test_training_under_torch_compile_matches_eager():
    _, model = _hf("llama")
    eager = copy.deepcopy(model)
    inputs = {**hf_inputs("llama"), "labels": hf_inputs("llama")["input_ids"]}
    compiled = torch.compile(model, backend="aot_eager")
    model.train()
    eager.train()
    loss = compiled(**inputs).loss
    loss.backward()
    want = eager(**inputs).loss
    want.backward()
    torch.testing.assert_close(loss, want, **TOL)
    grads, expected = adapter_grads(model), adapter_grads(eager)
    for key, g in grads.items():
        torch.testing.assert_close(g, expected[key], **TOL, msg=str(key))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = [loss.item()]
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        loss = compiled(**inputs).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_switching_under_torch_compile_matches_eager():
    spec = _spec(FAMILY_TARGETS["llama"])
    spec["adapters"]["other"] = {"r": 2, "targets": {"kind": "names", "names": ["q_proj"]}}
    base, model = _hf("llama", spec)
    base.eval()
    inputs = hf_inputs("llama")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)

    def check() -> torch.Tensor:
        out = output_tensor(compiled(**inputs))
        torch.testing.assert_close(out, output_tensor(model(**inputs)), **TOL)
        return out

    model.train()
    check()
    model.eval()
    with torch.no_grad():
        adapted = check()
        with adaptc.disabled(model):
            torch.testing.assert_close(check(), output_tensor(base(**inputs)), **TOL)
        assert torch.equal(check(), adapted)
        adaptc.set_active(model, "other")
        assert not torch.allclose(check(), adapted, atol=1e-4)
        adaptc.set_active(model, "default")
        assert torch.equal(check(), adapted)
        frames = counter.frame_count
        for _ in range(4):  # toggling back and forth reuses the compilations
            with adaptc.disabled(model):
                check()
            check()
        assert counter.frame_count == frames
    torch.save(model, io.BytesIO())  # the per-graph classes do not get in the way of pickling


def test_checkpointing_under_torch_compile_adds_no_graph_break():
    """With checkpointing on, transformers' own input-grad hook and its use_cache warning
    break the graph; the adapted model breaks exactly where the frozen base does."""
    base = tiny_hf("llama").requires_grad_(False)  # frozen, as under an adapter
    model = adaptc.compile(base, _spec(FAMILY_TARGETS["llama"]))
    inputs = hf_inputs("llama")
    for m in (base, model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    assert _breaks(model, inputs) <= _breaks(base, inputs)
