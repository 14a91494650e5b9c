"""Traced models with optional arguments: a graph holds for the argument pattern it was
traced with, and every pattern gives what the model and peft give.

torch.fx traces ``forward`` once; ``if mask is not None`` on a proxy is always true, and
a bool flag or a loop count does not trace at all. Each pattern-sensitive argument (a
default of None or a plain value) is traced with a concrete value; the compiled forward
checks each call's pattern and traces a new one on its first call, with the adapters the
model carries at that moment (active, disabled, mixed, merged).
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import peft
import pytest
import torch
from torch import fx, nn
from torch._dynamo.testing import CompileCounter

import adaptc
from adaptc.adapters.hotswap import prepare_hotswap
from adaptc.compiler import retrace
from adaptc.compiler.patterns import PatternGraphModule
from adaptc.io.swap import hotswap
from adaptc.methods.lora.branch import LoraBranch
from tests.compiler.models import DummyModel, NestedMLP, tiny_hf
from tests.compiler.parity import (
    adapter_grads,
    build_pair,
    peft_config,
    peft_grads,
    share_adapter_weights,
)
from tests.compiler.test_untouched import assert_same, snapshot

TOL = {"rtol": 1e-6, "atol": 1e-6}


class Masked(nn.Module):
    """``if mask is not None``: traced with a proxy, it would always multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if mask is not None:
            h = h * mask
        return self.fc2(h)


class Flagged(nn.Module):
    """A bool keyword picks the head: each pattern calls a target the other does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.head_a = nn.Linear(16, 4)
        self.head_b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, scale_out: bool = False) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if scale_out:
            return self.head_b(h) * 2.0
        return self.head_a(h)


class Looped(nn.Module):
    """An int keyword is a loop count; a keyword-only optional mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, n_steps: int = 1, *, mask: torch.Tensor | None = None):
        for _ in range(n_steps):
            x = x + torch.tanh(self.fc(x))
        if mask is not None:
            x = x * mask
        return self.out(x)


class Gated(nn.Module):
    """With a mask, the forward branches on a tensor's value: that pattern cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None and mask.sum() > 0:
            x = self.gate(x) * mask
        return self.fc(x)


def _x(seed: int = 0, shape: tuple[int, ...] = (3, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MASK16 = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
MASK8 = torch.rand(3, 8, generator=torch.Generator().manual_seed(6))
# model, its targets, and calls (args, kwargs) covering its patterns
CASES = {
    "mask": (Masked, ["fc1", "fc2"], [((_x(),), {}), ((_x(1),), {"mask": MASK16})]),
    "mask-positional": (Masked, ["fc1", "fc2"], [((_x(),), {}), ((_x(1), MASK16), {})]),
    "bool": (
        Flagged,
        ["fc1", "head_a", "head_b"],
        [((_x(),), {}), ((_x(1),), {"scale_out": True}), ((_x(2), False), {})],
    ),
    "int": (
        Looped,
        ["fc", "out"],
        [((_x(),), {}), ((_x(1), 3), {}), ((_x(2),), {"n_steps": 2, "mask": MASK8})],
    ),
}


def _spec(targets: list[str], name: str = "default", **fields) -> dict:
    adapter = {"r": 4, "lora_alpha": 8, "targets": {"kind": "names", "names": targets}, **fields}
    return {"version": 1, "adapters": {name: adapter}}


def _pair(cls: type[nn.Module], targets: list[str]) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = cls().eval()
    peft_model, compiled = build_pair(model, _spec(targets))
    return model, peft_model.eval(), compiled.eval()


@pytest.mark.parametrize("order", ["defaults-first", "reversed"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_pattern_equals_peft_and_the_original(case, order):
    cls, targets, calls = CASES[case]
    torch.manual_seed(0)
    model = cls().eval()
    before = snapshot(model)
    originals = [model(*a, **k) for a, k in calls]
    peft_model, compiled = build_pair(model, _spec(targets))
    peft_model.eval()
    compiled.eval()
    assert isinstance(compiled, PatternGraphModule)  # the whole model is one graph
    for args, kwargs in calls if order == "defaults-first" else calls[::-1]:
        with torch.no_grad():
            ours = compiled(*args, **kwargs)
            torch.testing.assert_close(ours, peft_model(*args, **kwargs), **TOL)
            assert not torch.allclose(ours, model(*args, **kwargs), atol=1e-4)
            with adaptc.disabled(compiled):
                torch.testing.assert_close(compiled(*args, **kwargs), model(*args, **kwargs))
    for (args, kwargs), want in zip(calls, originals, strict=True):  # the original: untouched
        torch.testing.assert_close(model(*args, **kwargs), want, rtol=0, atol=0)
    assert_same(before, snapshot(model))


def test_a_pattern_is_traced_once_and_positional_and_keyword_calls_share_it():
    _, _, compiled = _pair(Masked, ["fc1", "fc2"])
    x = _x()
    assert list(inspect.signature(compiled.forward).parameters) == ["x", "mask"]
    (placeholder,) = (n for n in compiled.graph.nodes if n.target == "mask")
    assert not placeholder.users  # the main graph: mask is None
    first = compiled(x, MASK16)
    graphs = dict(compiled.pattern_graphs)
    assert len(graphs) == 1
    (graph,) = graphs.values()
    assert any(n.op == "placeholder" and n.target == "mask" and n.users for n in graph.nodes)
    torch.testing.assert_close(compiled(x, mask=MASK16), first, rtol=0, atol=0)
    torch.testing.assert_close(compiled(mask=MASK16, x=x), first, rtol=0, atol=0)
    assert compiled.pattern_graphs.keys() == graphs.keys()  # no new trace
    assert not torch.allclose(compiled(x), first)


def test_gradients_of_a_later_pattern_equal_peft():
    _, peft_model, compiled = _pair(Flagged, ["fc1", "head_a", "head_b"])
    compiled.train()
    peft_model.train()
    x = _x()
    losses = []
    for model in (compiled, peft_model):  # the main pattern, then one traced on its call
        out = model(x), model(x, scale_out=True)
        losses.append(out)
        (out[0].pow(2).mean() + out[1].pow(2).mean()).backward()
    for ours, theirs in zip(*losses, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    grads = adapter_grads(compiled)
    for key, want in peft_grads(peft_model, grads).items():
        torch.testing.assert_close(grads[key], want, **TOL, msg=str(key))


def test_a_number_the_code_only_computes_with_stays_a_graph_input():
    """``NestedMLP.forward(x, scale: float = 1.0)`` multiplies by ``scale``: one graph
    serves every value, with no check and no retrace; ``Looped``'s ``range(n_steps)``
    cannot, so its count is part of the pattern."""
    torch.manual_seed(0)
    model = NestedMLP(dim=8, depth=2).eval()
    peft_model, compiled = build_pair(model, _spec(["fc1", "head"]))
    assert isinstance(compiled, fx.GraphModule)
    assert not isinstance(compiled, PatternGraphModule)
    assert any(n.op == "placeholder" and n.target == "scale" for n in compiled.graph.nodes)
    with torch.no_grad():
        for scale in (1.0, 0.5, 3, -2.25):
            torch.testing.assert_close(
                compiled(_x(), scale=scale), peft_model.eval()(_x(), scale=scale), **TOL
            )
    _, _, looped = _pair(Looped, ["fc", "out"])
    assert isinstance(looped, PatternGraphModule)


def test_models_without_optional_arguments_keep_a_plain_graph():
    compiled = adaptc.compile(DummyModel(), _spec(["linear"]))
    assert isinstance(compiled, fx.GraphModule)
    assert not isinstance(compiled, PatternGraphModule)  # no check on every call
    llama = adaptc.compile(tiny_hf("llama"), _spec(["gate_proj", "q_proj"]))
    graphs = [m for m in llama.modules() if isinstance(m, fx.GraphModule)]
    assert graphs
    assert not any(isinstance(m, PatternGraphModule) for m in graphs)


# --- adapter state: every pattern's graph carries what the main one carries ---------------


def _two_specs(targets: list[str]) -> tuple[dict, dict]:
    return _spec(targets, "one"), _spec(targets, "two", r=2)


def _peft_with_both(model: nn.Module, targets: list[str]) -> nn.Module:
    one, two = _two_specs(targets)
    spec = adaptc.load_spec({"version": 1, "adapters": {**one["adapters"], **two["adapters"]}})
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(spec, "one"), "one")
    peft_model.add_adapter("two", peft_config(spec, "two"))
    return peft_model.eval()


def _two_adapters(cls: type[nn.Module], targets: list[str]):
    torch.manual_seed(0)
    model = cls().eval()
    one, two = _two_specs(targets)
    compiled = adaptc.compile(
        model, {"version": 1, "adapters": {**one["adapters"], **two["adapters"]}}
    )
    peft_model = _peft_with_both(model, targets)
    share_adapter_weights(peft_model, compiled)
    return model, peft_model, compiled.eval()


def _check(compiled, peft_model, calls):
    with torch.no_grad():
        for args, kwargs in calls:
            torch.testing.assert_close(
                compiled(*args, **kwargs), peft_model(*args, **kwargs), **TOL
            )


BOOL_CALLS = CASES["bool"][2]


def test_switching_reaches_patterns_traced_before_and_after():
    model, peft_model, compiled = _two_adapters(Flagged, ["fc1", "head_a", "head_b"])
    x = _x()
    _check(compiled, peft_model, BOOL_CALLS[:1])  # adapter one, main pattern only
    adaptc.set_active(compiled, "two")
    peft_model.set_adapter("two")
    _check(compiled, peft_model, BOOL_CALLS)  # scale_out=True: traced while two is active
    adaptc.set_active(compiled, "one")
    peft_model.set_adapter("one")
    _check(compiled, peft_model, BOOL_CALLS)  # ... and then carries one
    with torch.no_grad(), adaptc.disabled(compiled):
        torch.testing.assert_close(compiled(x, scale_out=True), model(x, scale_out=True))
        torch.testing.assert_close(compiled(x), model(x))


def test_merge_folds_layers_only_a_later_pattern_calls():
    _, peft_model, compiled = _pair(Flagged, ["fc1", "head_a", "head_b"])
    x = _x()
    compiled(x)  # head_b: called by no graph traced yet
    merged = adaptc.merge(compiled)
    assert not any(isinstance(m, LoraBranch) for m in merged.modules())
    with torch.no_grad():
        for args, kwargs in BOOL_CALLS:
            want = peft_model(*args, **kwargs)
            torch.testing.assert_close(merged(*args, **kwargs), want, rtol=1e-5, atol=1e-5)
        _check(compiled, peft_model, BOOL_CALLS)  # the unmerged model is still itself
    assert set(merged.state_dict()) == set(Flagged().state_dict())


def test_add_adapter_and_mixed_batches_reach_every_pattern():
    torch.manual_seed(0)
    model = Flagged().eval()
    targets = ["fc1", "head_a", "head_b"]
    one, two = _two_specs(targets)
    compiled = adaptc.compile(model, one).eval()
    compiled(_x(), scale_out=True)  # a pattern traced before the adapter is added
    adaptc.add_adapter(compiled, two)
    peft_model = _peft_with_both(model, targets)
    share_adapter_weights(peft_model, compiled)
    adaptc.set_active(compiled, "two")
    peft_model.set_adapter("two")
    _check(compiled, peft_model, BOOL_CALLS)
    adaptc.set_active(compiled, "one")
    with torch.no_grad():
        x2 = _x(3, (2, 8))
        alone = {}
        for name in ("one", "two"):
            adaptc.set_active(compiled, name)
            alone[name] = (compiled(x2), compiled(x2, scale_out=True))
        adaptc.set_active(compiled, "one")
        with adaptc.mixed_batch(compiled, ["two", "one"]):
            mixed = (compiled(x2), compiled(x2, scale_out=True))
        for i, name in enumerate(["two", "one"]):
            for got, want in zip(mixed, alone[name], strict=True):
                torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x2, scale_out=True), alone["one"][1])


def test_a_pattern_first_met_inside_a_mixed_batch():
    _, peft_model, compiled = _two_adapters(Masked, ["fc1", "fc2"])
    x, mask = _x(shape=(2, 8)), MASK16[:2]
    with torch.no_grad():
        compiled(x)
        with adaptc.mixed_batch(compiled, ["two", "one"]):
            out = compiled(x, mask)  # traced here, in its mixed form
        assert len(compiled.pattern_graphs) == 1
        for i, name in enumerate(["two", "one"]):
            peft_model.set_adapter(name)
            torch.testing.assert_close(out[i], peft_model(x, mask)[i], rtol=1e-5, atol=1e-5)
        peft_model.set_adapter("one")
        _check(compiled, peft_model, [((x, mask), {}), ((x,), {})])  # out of the block: plain


def test_copies_and_pickles_keep_every_pattern(tmp_path):
    _, peft_model, compiled = _pair(Looped, ["fc", "out"])
    calls = CASES["int"][2]
    _check(compiled, peft_model, calls[:2])
    for copied in (
        copy.deepcopy(compiled),
        torch.load(_saved(compiled), weights_only=False),
    ):
        assert isinstance(copied, PatternGraphModule)
        assert copied.pattern_graphs.keys() == compiled.pattern_graphs.keys()
        _check(copied.eval(), peft_model, calls)
    adaptc.save_adapter(compiled, tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = adaptc.load_adapter(Looped(), tmp_path / "adapter").eval()
    _check(loaded, peft_model, calls[::-1])


def test_hotswap_reaches_every_pattern(tmp_path):
    torch.manual_seed(0)
    base = Flagged().eval()
    targets = ["fc1", "head_a", "head_b"]
    for seed, (r, alpha) in enumerate([(4, 8), (3, 1.5)]):
        torch.manual_seed(seed + 1)
        trained = adaptc.compile(base, _spec(targets, r=r, lora_alpha=alpha, init="random"))
        adaptc.save_adapter(trained, tmp_path / str(seed))
    model = adaptc.load_adapter(base, tmp_path / "0").eval()
    model(_x(), scale_out=True)  # a pattern traced before preparing
    prepare_hotswap(model, max_rank=8)
    hotswap(model, tmp_path / "1")
    _check(model, adaptc.load_adapter(base, tmp_path / "1").eval(), BOOL_CALLS)


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


# --- patterns that cannot trace ----------------------------------------------------------


def test_a_pattern_that_does_not_trace_runs_as_python_and_warns_once():
    model, peft_model, compiled = _pair(Gated, ["fc", "gate"])
    x = _x()
    retrace._WARNED.clear()
    with torch.no_grad():
        _check(compiled, peft_model, [((x,), {})])
        with pytest.warns(adaptc.AdaptcWarning, match=r"Gated\(mask=<value>\).*runs as Python"):
            _check(compiled, peft_model, [((x, MASK8), {})])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check(compiled, peft_model, [((x, MASK8), {}), ((x, -MASK8), {})])
        assert list(compiled.pattern_graphs.values()) == [None]
        with adaptc.disabled(compiled):
            torch.testing.assert_close(compiled(x, MASK8), model(x, MASK8))
        merged = adaptc.merge(compiled)
        torch.testing.assert_close(merged(x, MASK8), peft_model(x, MASK8), rtol=1e-5, atol=1e-5)


def test_beyond_the_pattern_limit_calls_run_as_python(monkeypatch):
    monkeypatch.setattr(retrace, "MAX_PATTERNS", 3)
    retrace._WARNED.clear()
    _, peft_model, compiled = _pair(Looped, ["fc", "out"])
    calls = [((_x(),), {"n_steps": n}) for n in range(1, 6)]
    with pytest.warns(adaptc.AdaptcWarning, match="3 patterns"):
        _check(compiled, peft_model, calls)
    assert len(compiled.pattern_graphs) == 2


# --- torch.compile -----------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("case", ["mask", "bool", "int"])
def test_torch_compile_runs_every_pattern(case):
    cls, targets, calls = CASES[case]
    _, peft_model, compiled = _pair(cls, targets)
    counter = CompileCounter()
    fast = torch.compile(compiled, backend=counter)
    with torch.no_grad():
        for args, kwargs in calls + calls[::-1]:  # new patterns are traced as they come
            torch.testing.assert_close(fast(*args, **kwargs), peft_model(*args, **kwargs), **TOL)
        frames = counter.frame_count
        for args, kwargs in calls:  # every pattern known: nothing recompiles
            fast(*args, **kwargs)
        assert counter.frame_count == frames
        full = torch.compile(compiled, fullgraph=True, backend="aot_eager")
        for args, kwargs in calls:
            torch.testing.assert_close(full(*args, **kwargs), peft_model(*args, **kwargs), **TOL)


@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_compile_follows_switches_in_every_pattern():
    model, peft_model, compiled = _two_adapters(Flagged, ["fc1", "head_a", "head_b"])
    fast = torch.compile(compiled, backend="aot_eager")
    x = _x()
    with torch.no_grad():
        for name in ("two", "one", "two"):
            adaptc.set_active(compiled, name)
            peft_model.set_adapter(name)
            for args, kwargs in BOOL_CALLS:
                torch.testing.assert_close(
                    fast(*args, **kwargs), peft_model(*args, **kwargs), **TOL
                )
        with adaptc.disabled(compiled):
            torch.testing.assert_close(fast(x, scale_out=True), model(x, scale_out=True))
