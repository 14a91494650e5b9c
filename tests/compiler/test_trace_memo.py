"""Identical blocks are traced once; blocks that differ in anything a trace reads are not."""

from __future__ import annotations

import torch
from torch import nn

import adaptc
import adaptc.compiler.trace as trace


class Block(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.scale = scale  # a plain attribute: fx bakes its value into the graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) * self.scale


class Stack(nn.Module):
    def __init__(self, scales: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(s) for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent: the root does not trace, its blocks do
            return x
        for block in self.blocks:
            x = block(x)
        return x


SPEC = {
    "version": 1,
    "adapters": {"a": {"r": 2, "init": "random", "targets": {"kind": "names", "names": ["fc"]}}},
}


def traced(monkeypatch, model):
    calls = []
    real = trace._trace_fixing_what_it_must

    def counting(module, leaves):
        calls.append(type(module).__name__)
        return real(module, leaves)

    monkeypatch.setattr(trace, "_trace_fixing_what_it_must", counting)
    return adaptc.compile(model, SPEC), calls


def check_outputs(model, compiled):
    x = torch.randn(3, 8)
    with torch.no_grad(), adaptc.disabled(compiled):
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_identical_blocks_are_traced_once(monkeypatch):
    model = Stack([2.0, 2.0, 2.0])
    compiled, calls = traced(monkeypatch, model)
    assert calls.count("Block") == 1
    assert all(b.code == compiled.blocks[0].code for b in compiled.blocks)
    check_outputs(model, compiled)


def test_blocks_that_differ_in_a_plain_attribute_are_traced_apart(monkeypatch):
    model = Stack([2.0, 3.0, 2.0])
    compiled, calls = traced(monkeypatch, model)
    assert calls.count("Block") == 2
    assert "3.0" in compiled.blocks[1].code and "3.0" not in compiled.blocks[0].code
    check_outputs(model, compiled)


def test_a_block_with_a_hook_is_traced_on_its_own(monkeypatch):
    model = Stack([2.0, 2.0])
    model.blocks[1].act.register_forward_hook(lambda m, i, o: o + 1)
    compiled, calls = traced(monkeypatch, model)
    assert calls.count("Block") == 2
    check_outputs(model, compiled)
