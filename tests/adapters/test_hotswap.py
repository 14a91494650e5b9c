"""Hotswapping: a new adapter's weights, in place, under ``torch.compile`` without recompiling.

The reference for every swap is a fresh ``load_adapter`` of the new adapter onto the
original model; recompilations are counted with dynamo's ``CompileCounter``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter

import adaptc
import adaptc.adapters.keys
from adaptc.adapters.hotswap import HotswapError, is_prepared, prepare_hotswap
from adaptc.compiler.compile import compiled_info
from adaptc.io import adapter_state_dict
from adaptc.io.swap import hotswap
from adaptc.methods.lora.branch import SCALING_BUFFER
from tests.compiler.models import ConvNet, DummyModel, NestedMLP, hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor
from tests.compiler.test_untouched import assert_same, snapshot

TOL = {"rtol": 1e-6, "atol": 1e-6}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def spec(names: list[str], r: int, alpha: float, **fields: object) -> dict:
    adapter = {"r": r, "lora_alpha": alpha, "init": "random", **fields}
    return {
        "version": 1,
        "adapters": {"default": {"targets": {"kind": "names", "names": names}, **adapter}},
    }


def saved(base: nn.Module, spec_: dict, directory: Path, seed: int) -> Path:
    """An adapter 'trained' from ``seed`` (random A and B), saved to ``directory``."""
    torch.manual_seed(seed)
    model = adaptc.compile(base, spec_)
    with torch.no_grad():  # non-trivial magnitudes for DoRA
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    adaptc.save_adapter(model, directory)
    return directory


# name: (model factory, inputs, target names, second adapter's extra fields)
CASES = {
    "linear": (NestedMLP, lambda: (torch.randn(2, 12),), ["fc1", "fc2", "head"], {}),
    "embedding": (DummyModel, lambda: (torch.randint(0, 10, (2, 5)),), ["embedding", "linear"], {}),
    "conv": (ConvNet, lambda: (torch.randn(2, 3, 5, 5),), ["conv", "head"], {}),
    "dora": (NestedMLP, lambda: (torch.randn(2, 12),), ["fc1", "head"], {"use_dora": True}),
    "rslora-patterns": (
        NestedMLP,
        lambda: (torch.randn(2, 12),),
        ["fc1", "fc2"],
        {"use_rslora": True, "rank_pattern": {"fc2": 2}, "alpha_pattern": {"fc1": 5}},
    ),
}


def _case(name: str, tmp_path: Path) -> tuple[nn.Module, tuple, Path, Path]:
    factory, inputs, names, extra = CASES[name]
    torch.manual_seed(0)
    base = factory().eval()
    dora = {"use_dora": True} if extra.get("use_dora") else {}
    first = saved(base, spec(names, 4, 8, **dora), tmp_path / "first", seed=1)
    second = saved(base, spec(names, 6, 3, **extra), tmp_path / "second", seed=2)
    return base, inputs(), first, second


@pytest.mark.parametrize("name", list(CASES))
def test_hotswap_equals_a_fresh_load_without_recompiling(name, tmp_path):
    base, x, first, second = _case(name, tmp_path)
    model = adaptc.load_adapter(base, first).eval()
    prepare_hotswap(model, max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        before = compiled(*x)
        torch.testing.assert_close(before, adaptc.load_adapter(base, first).eval()(*x), **TOL)
        frames = counter.frame_count
        hotswap(compiled, second)
        after = compiled(*x)
        expected = adaptc.load_adapter(base, second).eval()(*x)
        hotswap(compiled, first)  # and back
        again = compiled(*x)
    torch.testing.assert_close(after, expected, **TOL)
    torch.testing.assert_close(again, before, **TOL)
    assert not torch.allclose(after, before)
    assert counter.frame_count == frames  # not one recompilation


def test_prepare_changes_neither_outputs_nor_state_dict_keys():
    torch.manual_seed(0)
    base = NestedMLP()
    model = adaptc.compile(base, spec(["fc1", "fc2"], 4, 8, use_dora=False))
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = model(x)
    keys = {k: v.dtype for k, v in model.state_dict().items()}
    code = model.code
    assert "* 2.0" in code  # the scaling is a constant before preparing
    prepare_hotswap(model, max_rank=16)
    assert SCALING_BUFFER in model.code and "* 2.0" not in model.code
    assert {k: v.dtype for k, v in model.state_dict().items()} == keys  # no new persistent key
    assert model.get_submodule("blocks.0.fc1.lora_default.lora_A").weight.shape == (16, 12)
    assert model.get_submodule("blocks.0.fc1.lora_default.lora_B").weight.shape == (24, 16)
    assert is_prepared(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
    info = compiled_info(model)
    assert info is not None and info.spec.adapters["default"].r == 4  # the true rank


def test_unprepared_models_keep_their_generated_code():
    torch.manual_seed(0)
    model = adaptc.compile(NestedMLP(), spec(["fc1"], 4, 8))
    assert SCALING_BUFFER not in model.code
    assert not is_prepared(model)
    assert all(SCALING_BUFFER not in dict(m.named_buffers()) for m in model.modules())


def test_original_model_untouched(tmp_path):
    base, x, first, second = _case("dora", tmp_path)
    before = snapshot(base)
    model = adaptc.load_adapter(base, first)
    prepare_hotswap(model, max_rank=8)
    hotswap(model, second)
    model(*x)
    assert_same(before, snapshot(base))


def test_hf_model_hotswap_without_recompiling(tmp_path):
    base = tiny_hf("llama").eval()
    x = hf_inputs("llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    first = saved(base, spec(targets, 2, 4), tmp_path / "a", seed=1)
    second = saved(base, spec(targets, 8, 32), tmp_path / "b", seed=2)
    model = adaptc.load_adapter(base, first).eval()
    prepare_hotswap(model, max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(**x)
        frames = counter.frame_count
        hotswap(compiled, second)
        out = output_tensor(compiled(**x))
        expected = output_tensor(adaptc.load_adapter(base, second).eval()(**x))
    torch.testing.assert_close(out, expected, **TOL)
    assert counter.frame_count == frames


def test_inductor_does_not_recompile(tmp_path):
    base, x, first, second = _case("embedding", tmp_path)
    model = adaptc.load_adapter(base, first).eval()
    prepare_hotswap(model, max_rank=8)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    counters = torch._dynamo.utils.counters
    with torch.no_grad():
        compiled(*x)
        graphs = counters["stats"]["unique_graphs"]
        hotswap(compiled, second)
        out = compiled(*x)
    torch.testing.assert_close(out, adaptc.load_adapter(base, second)(*x), **TOL)
    assert counters["stats"]["unique_graphs"] == graphs


def test_same_rank_and_scaling_needs_no_preparation(tmp_path):
    base, x, first, _ = _case("linear", tmp_path)
    names = CASES["linear"][2]
    other = saved(base, spec(names, 4, 8), tmp_path / "other", seed=7)
    smaller = saved(base, spec(names, 2, 4), tmp_path / "smaller", seed=8)  # same scaling 2
    model = adaptc.load_adapter(base, first).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(*x)
        for directory in (other, smaller):
            hotswap(compiled, directory)
            expected = adaptc.load_adapter(base, directory)(*x)
            torch.testing.assert_close(compiled(*x), expected, **TOL)
    assert counter.frame_count == 1


def test_a_subset_of_the_targets_zeroes_the_others(tmp_path):
    torch.manual_seed(0)
    base = NestedMLP().eval()
    x = torch.randn(2, 12)
    first = saved(base, spec(["fc1", "fc2"], 4, 8, use_dora=True), tmp_path / "a", seed=1)
    second = saved(base, spec(["fc1"], 2, 8, use_dora=True), tmp_path / "b", seed=2)
    model = adaptc.load_adapter(base, first).eval()
    prepare_hotswap(model, max_rank=4)
    hotswap(model, second)
    with torch.no_grad():  # DoRA on the untargeted fc2 is the identity again
        torch.testing.assert_close(model(x), adaptc.load_adapter(base, second)(x), **TOL)
    info = compiled_info(model)
    assert info is not None
    assert [t.path for t in info.plan.targets] == [f"blocks.{i}.fc1" for i in range(3)]
    assert {t.r for t in info.plan.targets} == {2}
    hotswap(model, first)  # the zeroed layers can be targeted again
    with torch.no_grad():
        torch.testing.assert_close(model(x), adaptc.load_adapter(base, first)(x), **TOL)
    assert len(info.plan.targets) == 6


def test_saving_after_a_hotswap_writes_the_new_adapter(tmp_path):
    torch.manual_seed(0)
    base = NestedMLP().eval()
    x = torch.randn(2, 12)
    first = saved(base, spec(["fc1", "fc2"], 4, 8), tmp_path / "a", seed=1)
    second = saved(base, spec(["fc1"], 2, 3), tmp_path / "b", seed=2)
    model = adaptc.load_adapter(base, first)
    prepare_hotswap(model, max_rank=8)
    hotswap(model, second)
    adaptc.save_adapter(model, tmp_path / "out")
    written = adapter_state_dict(adaptc.load_adapter(base, tmp_path / "out"), "default")
    reference = adapter_state_dict(adaptc.load_adapter(base, second), "default")
    assert written.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(written[key], tensor, rtol=0, atol=0)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(adaptc.load_adapter(base, tmp_path / "out")(x), model(x))


def test_from_a_state_dict_and_config(tmp_path):
    base, x, first, second = _case("linear", tmp_path)
    model = adaptc.load_adapter(base, first)
    prepare_hotswap(model, max_rank=8)
    reference = adaptc.load_adapter(base, second)
    state = adapter_state_dict(reference, "default")
    config = json.loads((second / "adapter_config.json").read_text())
    hotswap(model, state, config=config)
    with torch.no_grad():
        torch.testing.assert_close(model(*x), reference(*x), **TOL)


def test_another_adapter_is_left_alone(tmp_path):
    torch.manual_seed(0)
    base = NestedMLP().eval()
    x = torch.randn(2, 12)
    fc = {"kind": "names", "names": ["fc1"]}
    two = {
        "version": 1,
        "adapters": {
            "default": {"targets": fc, "init": "random"},
            "other": {"targets": fc, "init": "random", "r": 2},
        },
    }
    model = adaptc.compile(base, two).eval()
    prepare_hotswap(model, max_rank=8, adapters=["other"])
    new = saved(base, spec(["fc1"], 8, 1), tmp_path / "new", seed=3)
    with torch.no_grad():
        expected_default = model(x)
        hotswap(model, new, adapter="other")
        torch.testing.assert_close(model(x), expected_default, rtol=0, atol=0)
        adaptc.set_active(model, "other")
        torch.testing.assert_close(model(x), adaptc.load_adapter(base, new)(x), **TOL)


# --- errors: one line, saying what to do; nothing is written -----------------------------


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_error_other_scaling_without_preparation(tmp_path):
    base, _, first, second = _case("linear", tmp_path)
    names = CASES["linear"][2]
    model = adaptc.load_adapter(base, first)
    before = _weights(model)
    other_alpha = saved(base, spec(names, 4, 16), tmp_path / "alpha", seed=3)
    scaling = (
        r"scales blocks\.0\.fc1 by 4 \(lora_alpha 16, r 4\), the model by 2, a constant in its "
        r"generated code; call adaptc\.prepare_hotswap\(model, max_rank=\.\.\.\) before torch"
    )
    with pytest.raises(HotswapError, match=scaling):
        hotswap(model, other_alpha)
    rank = r"has rank 6 at blocks\.0\.fc1; the model's rank is 4; call adaptc\.prepare_hotswap"
    with pytest.raises(HotswapError, match=rank):
        hotswap(model, second)
    _unchanged(model, before)


def test_error_rank_above_the_prepared_maximum(tmp_path):
    base, _, first, second = _case("linear", tmp_path)
    model = adaptc.load_adapter(base, first)
    prepare_hotswap(model, max_rank=5)
    before = _weights(model)
    with pytest.raises(HotswapError, match="the model was prepared for rank at most 5"):
        hotswap(model, second)
    _unchanged(model, before)


def test_error_new_targets(tmp_path):
    torch.manual_seed(0)
    base = NestedMLP()
    first = saved(base, spec(["fc1"], 4, 8), tmp_path / "a", seed=1)
    wider = saved(base, spec(["fc1", "fc2"], 4, 8), tmp_path / "b", seed=2)
    model = adaptc.load_adapter(base, first)
    before = _weights(model)
    with pytest.raises(HotswapError, match=r"6 unexpected key\(s\) .*may only target layers"):
        hotswap(model, wider)
    _unchanged(model, before)


def test_error_structural_settings(tmp_path):
    torch.manual_seed(0)
    base = NestedMLP()
    first = saved(base, spec(["fc1"], 4, 8), tmp_path / "a", seed=1)
    dora = saved(base, spec(["fc1"], 4, 8, use_dora=True), tmp_path / "b", seed=2)
    model = adaptc.load_adapter(base, first)
    with pytest.raises(HotswapError, match="has use_dora=True, the model False; hotswapping"):
        hotswap(model, dora)


def test_error_prepare_after_torch_compile_and_bad_ranks(tmp_path):
    torch.manual_seed(0)
    model = adaptc.compile(NestedMLP(), spec(["fc1"], 4, 8))
    with pytest.raises(HotswapError, match=r"must be called before torch\.compile"):
        prepare_hotswap(torch.compile(model, backend="eager"))
    with pytest.raises(
        HotswapError, match=r"blocks\.0\.fc1 already has rank 4, more than max_rank=2"
    ):
        prepare_hotswap(model, max_rank=2)
    with pytest.raises(adaptc.CompileError, match="no adapter 'nope'"):
        prepare_hotswap(model, adapters=["nope"])
    with pytest.raises(adaptc.CompileError, match=r"takes a model returned by adaptc\.compile"):
        prepare_hotswap(NestedMLP())
    with pytest.raises(HotswapError, match="needs its config= as well"):
        hotswap(model, {})


def test_deepcopy_of_a_prepared_model_is_independent(tmp_path):
    base, x, first, second = _case("linear", tmp_path)
    model = adaptc.load_adapter(base, first)
    prepare_hotswap(model, max_rank=8)
    twin = copy.deepcopy(model)
    hotswap(model, second)
    with torch.no_grad():
        torch.testing.assert_close(twin(*x), adaptc.load_adapter(base, first)(*x), **TOL)


# --- parity with peft's hotswap_adapter ---------------------------------------------------


def test_peft_parity(tmp_path):
    import peft
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    base = tiny_hf("opt").eval()
    x = hf_inputs("opt")
    targets = ["q_proj", "v_proj", "fc1"]
    first = saved(base, spec(targets, 2, 4), tmp_path / "a", seed=1)
    second = saved(base, spec(targets, 8, 5, use_rslora=True), tmp_path / "b", seed=2)
    for extra in ("adaptc_spec.yaml",):  # peft reads only its own files
        (first / extra).unlink()
        (second / extra).unlink()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(first)).eval()
    prepare_model_for_compiled_hotswap(theirs, target_rank=8)
    config = json.loads((second / "adapter_config.json").read_text())
    config_first = json.loads((first / "adapter_config.json").read_text())
    assert config["use_rslora"] != config_first["use_rslora"]  # peft refuses that: align it
    config["use_rslora"] = False
    config["lora_alpha"] = 5 * 8 / 8**0.5  # the same scaling without rsLoRA
    (second / "adapter_config.json").write_text(json.dumps(config))
    hotswap_adapter(theirs, str(second), adapter_name="default", torch_device="cpu")
    model = adaptc.load_adapter(base, first).eval()
    prepare_hotswap(model, max_rank=8)
    hotswap(model, second)
    with torch.no_grad():
        torch.testing.assert_close(
            output_tensor(model(**x)), output_tensor(theirs(**x)), rtol=1e-6, atol=1e-6
        )
