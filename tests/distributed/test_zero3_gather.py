"""Saving under DeepSpeed ZeRO-3: partitioned adapter weights are gathered, never saved empty.

DeepSpeed is not installed here, so a fake ``deepspeed`` module stands in for it: a
"partitioned" parameter has an empty ``data`` and ``ds_id``/``ds_numel``/``ds_shape``, as
ZeRO-3 leaves it, and ``zero.GatheredParameters`` puts the full data back for the block
and partitions it again afterwards, as the real one does.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adaptc
from adaptc.adapters.keys import adapter_state_dict
from adaptc.integrations import deepspeed as ds
from tests.compiler.models import NestedMLP

SPEC = {
    "version": 1,
    "adapters": {
        "default": {
            "r": 4,
            "lora_alpha": 8,
            "bias": "lora_only",
            "targets": {"kind": "names", "names": ["fc1", "fc2"]},
            "modules_to_save": ["head"],
        },
        "other": {"r": 2, "lora_alpha": 2, "targets": {"kind": "names", "names": ["fc2"]}},
    },
}


class FakeZero3:
    """Partitions parameters as ZeRO-3 does and gathers them back on request."""

    def __init__(self) -> None:
        self.full: dict[int, torch.Tensor] = {}
        self.gathers: list[int] = []  # how many parameters each GatheredParameters call took
        self.module = types.ModuleType("deepspeed")
        self.module.zero = types.SimpleNamespace(GatheredParameters=self.gathered_parameters)  # type: ignore[attr-defined]

    def partition(self, model: nn.Module) -> None:
        for param in model.parameters():
            if hasattr(param, "ds_id"):  # shared parameters are partitioned once
                continue
            param.ds_id = len(self.full)  # type: ignore[attr-defined]
            param.ds_numel = param.numel()  # type: ignore[attr-defined]
            param.ds_shape = param.shape  # type: ignore[attr-defined]
            self.full[param.ds_id] = param.data  # type: ignore[attr-defined]
            param.data = torch.empty(0, dtype=param.dtype)  # this rank holds no element

    def gathered_parameters(self, params: Any, modifier_rank: int | None = None) -> Any:
        assert modifier_rank is None  # reading only: nothing to scatter back
        params = list(params)
        self.gathers.append(len(params))
        full = self.full

        class Gathered:
            def __enter__(self) -> None:
                for p in params:
                    p.data = full[p.ds_id]

            def __exit__(self, *exc: object) -> None:
                for p in params:
                    p.data = torch.empty(0, dtype=p.dtype)

        return Gathered()


@pytest.fixture
def zero3(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeZero3]:
    fake = FakeZero3()
    monkeypatch.setitem(sys.modules, "deepspeed", fake.module)
    yield fake


def _trained() -> tuple[nn.Module, nn.Module]:
    """A base model and its compiled copy with non-zero adapter weights (as after training)."""
    torch.manual_seed(0)
    base = NestedMLP(dim=8, depth=2)
    compiled = adaptc.compile(base, SPEC)
    with torch.no_grad():
        for p in compiled.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return base, compiled


def test_gathering_gives_the_full_adapter_and_leaves_it_partitioned(zero3: FakeZero3) -> None:
    _, compiled = _trained()
    expected = {n: adapter_state_dict(compiled, n) for n in ("default", "other")}
    assert any(".base_layer.bias" in k for k in expected["default"])  # bias: lora_only
    assert any(".head." in k for k in expected["default"])  # modules_to_save
    zero3.partition(compiled)

    # what a plain read (PEFT's get_peft_model_state_dict under ZeRO-3) would write
    empty = adapter_state_dict(compiled, "default")
    assert empty.keys() == expected["default"].keys()
    assert all(t.numel() == 0 for t in empty.values())

    for name in ("default", "other"):
        state = ds.gathered_adapter_state_dict(compiled, name)
        assert state.keys() == expected[name].keys()
        for key, tensor in state.items():
            torch.testing.assert_close(tensor, expected[name][key], rtol=0, atol=0, msg=key)
    assert zero3.gathers == [len(expected["default"]), len(expected["other"])]
    assert all(p.numel() == 0 for p in compiled.parameters())  # partitioned again


def test_save_writes_on_rank_0_what_the_unpartitioned_model_saves(
    zero3: FakeZero3, tmp_path: Path
) -> None:
    base, compiled = _trained()
    adaptc.save_adapter(compiled, tmp_path / "plain")
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected_out = compiled(x)
    zero3.partition(compiled)
    engine = nn.Module()  # DeepSpeed's engine holds the model as .module
    engine.module = compiled

    assert ds.save_adapter(engine, tmp_path / "rank1", rank=1) is None
    assert not (tmp_path / "rank1").exists()
    assert ds.save_adapter(engine, tmp_path / "zero3", rank=0) == tmp_path / "zero3"
    assert len(zero3.gathers) == 2  # every rank joins the gather, the writer or not

    for folder in (Path(), Path("other")):
        plain = load_file(tmp_path / "plain" / folder / "adapter_model.safetensors")
        saved = load_file(tmp_path / "zero3" / folder / "adapter_model.safetensors")
        assert saved.keys() == plain.keys()
        for key in plain:
            assert saved[key].numel() > 0, key
            torch.testing.assert_close(saved[key], plain[key], rtol=0, atol=0, msg=key)
    reloaded = adaptc.load_adapter(base, tmp_path / "zero3")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected_out)


def test_unpartitioned_models_need_no_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` fails
    _, compiled = _trained()
    state = ds.gathered_adapter_state_dict(compiled)
    expected = adapter_state_dict(compiled, "default")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_partitioned_without_deepspeed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeZero3()
    _, compiled = _trained()
    fake.partition(compiled)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(RuntimeError, match="partitioned by DeepSpeed ZeRO-3"):
        ds.gathered_adapter_state_dict(compiled)


def test_a_gather_that_leaves_a_tensor_empty_is_an_error(zero3: FakeZero3) -> None:
    _, compiled = _trained()
    zero3.partition(compiled)
    for key in zero3.full:
        zero3.full[key] = torch.empty(0)  # a broken gather
    with pytest.raises(RuntimeError, match="expected"):
        ds.gathered_adapter_state_dict(compiled)


def test_unknown_adapter_and_non_adaptc_model_are_errors(zero3: FakeZero3) -> None:
    _, compiled = _trained()
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        ds.save_adapter(compiled, "unused", adapters=["nope"])
    with pytest.raises(ValueError, match=r"adaptc.compile\(\)"):
        ds.gathered_adapter_state_dict(nn.Linear(2, 2))
