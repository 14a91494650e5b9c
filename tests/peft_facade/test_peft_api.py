"""PEFT's API, item by item: the same user code run with ``peft`` and with ``adaptc.peft``
gives the same result. Each test names the item of the API it covers; where adaptc is
deliberately different (docs/peft-migration.md) the test says how.

Both models carry the same weights: an adapter is trained (randomised) with peft, saved
with peft, and loaded by each library onto its own copy of the base model.
"""

from __future__ import annotations

import collections
import copy
import json
import os
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

import adaptc.peft as ap
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor

FAMILY = "opt"
TOL = {"rtol": 1e-5, "atol": 1e-6}
LIBS = (peft, ap)


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**hf_inputs(FAMILY)))


def train(model: nn.Module, seed: int = 0) -> None:
    """'Train' an adapter: random values for its trainable tensors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def saved(tmp_path: Path, name: str = "a", seed: int = 0, **config: Any) -> Path:
    """A peft adapter directory for the tiny OPT model, with trained weights."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    model = peft.get_peft_model(tiny_hf(FAMILY), peft.LoraConfig(**config))
    train(model, seed)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def both(base: nn.Module, directory: Path, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """(peft's model, adaptc's model) loaded from ``directory`` with the same arguments."""
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory, **kwargs)
    mine = ap.PeftModel.from_pretrained(base, directory, **kwargs)
    return theirs, mine


@pytest.fixture
def base() -> nn.Module:
    return tiny_hf(FAMILY).eval()


def status(model: nn.Module) -> dict[str, Any]:
    s = model.get_model_status()
    return {
        k: getattr(s, k)
        for k in ("enabled", "active_adapters", "merged_adapters", "available_adapters",
                  "requires_grad", "trainable_params", "total_params", "num_adapter_layers")
    }  # fmt: skip


# --- refused before; now as peft ----------------------------------------------------------


def test_merge_adapter_and_unmerge_adapter(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    before = out(mine)
    for model in (theirs, mine):
        model.merge_adapter()
    torch.testing.assert_close(out(mine), out(theirs), **TOL)
    torch.testing.assert_close(out(mine), before, **TOL)
    assert status(mine) == status(theirs) and status(mine)["merged_adapters"] == ["default"]
    for model in (theirs, mine):
        model.unmerge_adapter()
    torch.testing.assert_close(out(mine), before, rtol=0, atol=0)  # exact (peft: close)
    torch.testing.assert_close(out(theirs), before, **TOL)
    assert status(mine) == status(theirs) and status(mine)["merged_adapters"] == []


def test_merge_adapter_keyword_arguments(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for model in (theirs, mine):
        model.load_adapter(saved(tmp_path, "b", seed=1), "b")
        model.merge_adapter(adapter_names=["b"], safe_merge=True)
    torch.testing.assert_close(out(mine), out(theirs), **TOL)
    assert status(mine)["merged_adapters"] == status(theirs)["merged_adapters"] == ["b"]
    for model in (theirs, mine):
        with pytest.warns(UserWarning, match="All adapters are already merged"):
            model.merge_adapter(adapter_names=["b"])


def test_merged_model_disabled_runs_the_base_and_ends_unmerged(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for model in (theirs, mine):
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(out(model), out(base), **TOL)
    assert status(mine)["merged_adapters"] == status(theirs)["merged_adapters"] == []


def test_merged_adapter_cannot_be_deleted_nor_mixed(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for model in (theirs, mine):
        model.merge_adapter()
        with pytest.raises(ValueError, match="while they are merged"):
            model.delete_adapter("default")
        with pytest.raises(ValueError, match="merged adapters"):
            model(**hf_inputs(FAMILY), adapter_names=["default", "default"])


def test_merge_in_place_in_bfloat16_unmerges_exactly(base, tmp_path):
    directory = saved(tmp_path)
    theirs, mine = both(base.to(torch.bfloat16), directory)
    before = [p.clone() for p in mine.parameters()]
    for model in (theirs, mine):
        model.merge_adapter()
        model.unmerge_adapter()
    assert all(torch.equal(a, b) for a, b in zip(before, mine.parameters(), strict=True))


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(base, tmp_path, autocast):
    directory = saved(tmp_path)
    half = base.to(torch.bfloat16)
    theirs, mine = both(half, directory, autocast_adapter_dtype=autocast)
    dtypes = [{p.dtype for n, p in m.named_parameters() if "lora_" in n} for m in (theirs, mine)]
    assert dtypes[0] == dtypes[1] == {torch.float32 if autocast else torch.bfloat16}
    for lib, model in ((peft, theirs), (ap, mine)):
        model.add_adapter("b", lib.LoraConfig(r=2), autocast_adapter_dtype=autocast)
    torch.testing.assert_close(out(mine), out(theirs), rtol=2e-2, atol=2e-2)
    new = [{p.dtype for n, p in m.named_parameters() if "lora_" in n and "b" in n.split(".")[-2:]}
           for m in (theirs, mine)]  # fmt: skip
    assert new[0] == {torch.float32 if autocast else torch.bfloat16}


def test_get_peft_model_autocast_false(base):
    half = base.to(torch.bfloat16)
    for lib in LIBS:
        model = lib.get_peft_model(
            copy.deepcopy(half), lib.LoraConfig(), autocast_adapter_dtype=False
        )
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"torch_device": "cpu"},
        {"low_cpu_mem_usage": True},
        {"device_map": "cpu"},
        {"device_map": "auto"},
        {"device_map": {"": "cpu"}},
        {"is_trainable": True},
    ],
)
def test_loading_keyword_arguments(base, tmp_path, kwargs):
    theirs, mine = both(base, saved(tmp_path), **kwargs)
    torch.testing.assert_close(out(mine), out(theirs), **TOL)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (theirs, mine):
        model.load_adapter(saved(tmp_path, "b", seed=1), "b", **kwargs)
        model.set_adapter("b")
    torch.testing.assert_close(out(mine), out(theirs), **TOL)


def test_get_peft_model_low_cpu_mem_usage_counts(base):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(), low_cpu_mem_usage=True)
    mine = ap.get_peft_model(base, ap.LoraConfig(), low_cpu_mem_usage=True)
    # peft's adapter weights are on the meta device (to be loaded); adaptc's initialised
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(out(mine), out(base), rtol=0, atol=0)


def test_from_pretrained_with_config(base, tmp_path):
    directory = saved(tmp_path, lora_alpha=8)
    config = {"r": 4, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]}
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), directory, config=peft.LoraConfig(**config)
    )
    mine = ap.PeftModel.from_pretrained(base, directory, config=ap.LoraConfig(**config))
    torch.testing.assert_close(out(mine), out(theirs), **TOL)
    assert mine.peft_config["default"].lora_alpha == theirs.peft_config["default"].lora_alpha == 2


def test_ignore_mismatched_sizes(base, tmp_path):
    directory = saved(tmp_path)  # r=4
    config = {"r": 2, "target_modules": ["q_proj", "v_proj"]}
    for lib, model in ((peft, copy.deepcopy(base)), (ap, base)):
        with pytest.raises(RuntimeError, match="size mismatch"):
            lib.PeftModel.from_pretrained(model, directory, config=lib.LoraConfig(**config))
        with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
            loaded = lib.PeftModel.from_pretrained(
                model, directory, config=lib.LoraConfig(**config), ignore_mismatched_sizes=True
            )
        torch.testing.assert_close(out(loaded), out(base), rtol=0, atol=0)  # B stays 0


def _files(directory: Path) -> set[str]:
    return {
        str(p.relative_to(directory)) for p in directory.rglob("*")
        if p.is_file() and p.name not in ("adaptc_spec.yaml", "README.md")
    }  # fmt: skip


def test_save_pretrained_selected_adapters(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for name, model in (("theirs", theirs), ("mine", mine)):
        model.load_adapter(saved(tmp_path, "b", seed=1), "b")
        model.save_pretrained(tmp_path / name / "one", selected_adapters=["b"])
        model.save_pretrained(tmp_path / name / "all")
    assert _files(tmp_path / "mine" / "one") == _files(tmp_path / "theirs" / "one") == {
        "b/adapter_model.safetensors", "b/adapter_config.json"}  # fmt: skip
    assert _files(tmp_path / "mine" / "all") == _files(tmp_path / "theirs" / "all")


def test_save_pretrained_without_safetensors(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for name, model in (("theirs", theirs), ("mine", mine)):
        model.save_pretrained(tmp_path / name, safe_serialization=False)
    assert _files(tmp_path / "mine") == _files(tmp_path / "theirs") == {
        "adapter_model.bin", "adapter_config.json"}  # fmt: skip
    for directory in ("theirs", "mine"):  # each library reads the other's .bin
        again = [lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / directory)
                 for lib in LIBS]  # fmt: skip
        torch.testing.assert_close(out(again[1]), out(again[0]), **TOL)
    torch.testing.assert_close(out(again[1]), out(theirs), **TOL)


def test_create_or_update_model_card(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for name, model in (("theirs", theirs), ("mine", mine)):
        model.create_or_update_model_card(tmp_path / name)
    cards = [ModelCard.load(tmp_path / n / "README.md").data.to_dict() for n in ("theirs", "mine")]
    assert cards[1]["library_name"] == cards[0]["library_name"] == "peft"
    assert set(cards[0]["tags"]) - {"base_model:adapter:"} <= set(cards[1]["tags"])


def test_delete_the_last_adapter(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for model in (theirs, mine):
        model.delete_adapter("default")
        assert model.peft_config == {} and model.active_adapters == []
    torch.testing.assert_close(out(mine), out(base), rtol=0, atol=0)  # peft: a KeyError here
    for lib, model in ((peft, theirs), (ap, mine)):
        model.add_adapter("again", lib.LoraConfig(r=2))
        model.set_adapter("again")
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(out(mine), out(theirs), **TOL)


def test_from_pretrained_loads_the_top_level_adapter_then_load_adapter_the_others(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for name, model in (("theirs", theirs), ("mine", mine)):
        model.load_adapter(saved(tmp_path, "second", seed=1), "second")
        model.save_pretrained(tmp_path / name)
    for name in ("theirs", "mine"):
        again = [
            lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name) for lib in LIBS
        ]
        assert [list(m.peft_config) for m in again] == [["default"], ["default"]]
        for model in again:
            result = model.load_adapter(tmp_path / name / "second", "second")
            assert (result.missing_keys, result.unexpected_keys) == ([], [])
            model.set_adapter("second")
        torch.testing.assert_close(out(again[1]), out(again[0]), **TOL)


# --- functions and attributes ----------------------------------------------------------------


def test_get_and_set_peft_model_state_dict(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    state = [lib.get_peft_model_state_dict(m) for lib, m in ((peft, theirs), (ap, mine))]
    assert state[0].keys() == state[1].keys()
    for key in state[0]:
        torch.testing.assert_close(state[1][key], state[0][key], rtol=0, atol=0)
    fresh = [lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, lora_alpha=8,
             target_modules=["q_proj", "v_proj"])) for lib in LIBS]  # fmt: skip
    for lib, model in zip(LIBS, fresh, strict=True):
        result = lib.set_peft_model_state_dict(model, state[0])
        assert result.unexpected_keys == []
        assert not [k for k in result.missing_keys if "lora_" in k]
    torch.testing.assert_close(out(fresh[1]), out(theirs), **TOL)
    torch.testing.assert_close(out(fresh[0]), out(theirs), **TOL)


def test_get_peft_model_state_dict_of_an_injected_model(base):
    models = [lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["fc1"]),
              copy.deepcopy(base)) for lib in LIBS]  # fmt: skip
    keys = [set(lib.get_peft_model_state_dict(m)) for lib, m in zip(LIBS, models, strict=True)]
    assert keys[0] == keys[1] and all(not k.startswith("base_model.") for k in keys[1])


def test_get_and_set_base_model_state_dict(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path, modules_to_save=["lm_head"]))
    state = [lib.get_base_model_state_dict(m) for lib, m in ((peft, theirs), (ap, mine))]
    assert state[0].keys() == state[1].keys() == base.state_dict().keys()
    for key in state[0]:
        torch.testing.assert_close(state[1][key], state[0][key], rtol=0, atol=0)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    doubled = {k: v * 2 for k, v in state[0].items()}
    for lib, model in ((peft, theirs), (ap, mine)):
        lib.set_base_model_state_dict(model, doubled)
    torch.testing.assert_close(out(mine), out(theirs), **TOL)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())  # untouched


def test_load_peft_weights(tmp_path):
    directory = saved(tmp_path)
    theirs, mine = peft.load_peft_weights(str(directory)), ap.load_peft_weights(directory)
    assert theirs.keys() == mine.keys()


def test_targeted_module_names_and_modules_to_save(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path, target_modules=["q_proj", "fc1"],
                                    modules_to_save=["lm_head"]))  # fmt: skip
    assert mine.targeted_module_names == theirs.targeted_module_names
    assert mine.modules_to_save == theirs.modules_to_save == {"lm_head"}


def test_get_layer_status_and_get_model_status(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path), is_trainable=True)
    for model in (theirs, mine):
        model.load_adapter(saved(tmp_path, "b", seed=1, target_modules=["fc1"]), "b")
    fields = ("name", "module_type", "enabled", "active_adapters", "merged_adapters",
              "requires_grad", "available_adapters", "devices")  # fmt: skip
    layers = [[tuple(getattr(s, f) for f in fields) for s in lib.get_layer_status(m)]
              for lib, m in ((peft, theirs), (ap, mine))]  # fmt: skip
    assert sorted(layers[1]) == sorted(layers[0])
    assert status(mine) == status(theirs)
    for model in (theirs, mine):
        model.base_model.disable_adapter_layers()
    assert status(mine) == status(theirs) and status(mine)["enabled"] is False
    assert ap.get_model_status(mine).peft_types == peft.get_model_status(theirs).peft_types


def test_load_adapter_returns_the_load_result(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    # (not "b": peft keeps the missing keys whose name contains the adapter's, "base_model…")
    results = [m.load_adapter(saved(tmp_path, "second", seed=1), "second") for m in (theirs, mine)]
    assert [(r.missing_keys, r.unexpected_keys) for r in results] == [([], []), ([], [])]


def test_lora_config_from_json_file(tmp_path):
    path = saved(tmp_path) / "adapter_config.json"
    assert ap.LoraConfig.from_json_file(path) == peft.LoraConfig.from_json_file(str(path))


def test_prepare_model_for_gradient_checkpointing(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path), is_trainable=True)
    for model in (theirs, mine):
        inner = model.get_base_model()
        assert model.prepare_model_for_gradient_checkpointing(inner) is None  # as peft's
        emb = inner.get_input_embeddings()(torch.tensor([[1, 2]]))
        assert emb.requires_grad


def test_set_requires_grad_and_small_attributes(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for model in (theirs, mine):
        model.set_requires_grad("default")
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert mine.base_model_torch_dtype == theirs.base_model_torch_dtype
    assert mine.has_active_enabled_adapter == theirs.has_active_enabled_adapter is True


# --- behaviour that differed --------------------------------------------------------------


def test_deepcopy_is_a_peft_model(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path), is_trainable=True)
    for model in (theirs, mine):
        twin = copy.deepcopy(model)
        assert type(twin) is type(model)
        torch.testing.assert_close(out(twin), out(model), rtol=0, atol=0)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(1.0)  # an EMA step on the copy
        assert not torch.equal(out(twin), out(model))
    torch.testing.assert_close(out(mine), out(theirs), **TOL)


def test_disable_adapter_wins_over_adapter_names(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    for model in (theirs, mine):
        with model.disable_adapter():
            got = output_tensor(model(**hf_inputs(FAMILY), adapter_names=["default", "__base__"]))
        torch.testing.assert_close(got, out(base), rtol=0, atol=0)


def test_targets_also_excluded_are_excluded(base):
    config = {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]}
    models = [lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**config)) for lib in LIBS]
    assert models[1].targeted_module_names == models[0].targeted_module_names
    assert all("v_proj" not in n for n in models[1].targeted_module_names)


def test_mixed_batches_refuse_dora_only_when_it_is_in_the_batch(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path))
    x = hf_inputs(FAMILY)
    for model in (theirs, mine):
        model.load_adapter(saved(tmp_path, "dora", seed=1, use_dora=True), "dora")
    got = []
    for model in (theirs, mine):
        got.append(output_tensor(model(**x, adapter_names=["default", "__base__"])))
        with pytest.raises(ValueError, match=r"DoRA|dora"):
            model(**x, adapter_names=["dora", "default"])
    torch.testing.assert_close(got[1], got[0], **TOL)


def test_two_active_adapters_sharing_modules_to_save_raise(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path, modules_to_save=["lm_head"]))
    for model in (theirs, mine):
        model.load_adapter(saved(tmp_path, "b", seed=1, modules_to_save=["lm_head"]), "b")
        with pytest.raises(ValueError, match=r"(O|o)nly one"):
            model.base_model.set_adapter(["default", "b"])


def test_new_adapters_are_inactive_and_frozen(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path), is_trainable=True)
    for lib, model in ((peft, theirs), (ap, mine)):
        model.add_adapter("b", lib.LoraConfig(r=2))
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert status(mine)["requires_grad"] == status(theirs)["requires_grad"]
    for model in (theirs, mine):
        model.set_adapter("b")
    assert status(mine)["requires_grad"] == status(theirs)["requires_grad"]


def test_size_mismatch_on_load_is_a_runtime_error(base, tmp_path):
    wide = saved(tmp_path, r=4)
    for lib, model in ((peft, copy.deepcopy(base)), (ap, base)):
        narrow = lib.get_peft_model(model, lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        with pytest.raises(RuntimeError, match="size mismatch"):
            narrow.load_adapter(wide, "default")


def test_parameter_names_filter_alike(base, tmp_path):
    """Names differ (peft ``lora_A.<adapter>.weight``, adaptc ``lora_<adapter>.lora_A.weight``;
    docs/peft-migration.md), but the filters users write select the same tensors."""
    theirs, mine = both(base, saved(tmp_path), is_trainable=True)
    for needle in ("lora_A", "lora_B", "lora_"):
        counts = [sum(p.numel() for n, p in m.named_parameters() if needle in n)
                  for m in (theirs, mine)]  # fmt: skip
        assert counts[0] == counts[1] > 0, needle


def test_lora_config_from_pretrained_refuses_a_non_peft_json(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    for lib in LIBS:
        with pytest.raises(TypeError):
            lib.LoraConfig.from_pretrained(os.fspath(tmp_path))


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_auto_peft_model_with_a_device_map(tmp_path, device_map):
    import transformers

    tiny_hf(FAMILY).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, task_type="CAUSAL_LM"))
    train(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = [lib.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter",
              device_map=device_map) for lib in LIBS]  # fmt: skip
    assert type(loaded[1]).__name__ == type(loaded[0]).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(out(loaded[1]), out(loaded[0]), **TOL)


class _EveryKind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_the_same_seed_gives_peft_s_adapter_weights(dtype, init):
    """On a half-precision base too: PEFT's factors are its base dtype's values (built in
    float32, moved to the base dtype, back to float32), and so are adaptc's."""
    base = _EveryKind().to(dtype)
    config = {"r": 4, "target_modules": ["emb", "conv", "fc", "attn"], "init_lora_weights": init}
    state = []
    for lib, model in ((peft, copy.deepcopy(base)), (ap, base)):
        torch.manual_seed(0)
        state.append(
            lib.get_peft_model_state_dict(lib.get_peft_model(model, lib.LoraConfig(**config)))
        )
    assert state[0].keys() == state[1].keys()
    for key in state[0]:
        assert state[1][key].dtype == state[0][key].dtype, key
        torch.testing.assert_close(state[1][key], state[0][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_pretrained_converts_pissa_to_plain_lora(base, tmp_path, init):
    """PEFT's idiom: save the adapter before training (init as True), train, then save it
    converted against that initial state; the result is a plain LoRA of twice the rank
    that reproduces the trained model on the unchanged base."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "fc1"],
              "init_lora_weights": init}  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    train(model)
    model.save_pretrained(tmp_path / "trained")
    theirs, mine = both(base, tmp_path / "trained")
    trained = out(theirs)
    torch.testing.assert_close(out(mine), trained, **TOL)
    for name, m in (("theirs", theirs), ("mine", mine)):
        m.save_pretrained(
            tmp_path / name, path_initial_model_for_weight_conversion=str(tmp_path / "initial")
        )
    configs = [
        json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("theirs", "mine")
    ]
    for key in ("r", "lora_alpha", "init_lora_weights"):
        assert configs[1][key] == configs[0][key], key
    assert configs[1]["r"] == 8 and configs[1]["init_lora_weights"] is True
    files = [peft.load_peft_weights(str(tmp_path / n)) for n in ("theirs", "mine")]
    assert files[0].keys() == files[1].keys()
    for key in files[0]:
        torch.testing.assert_close(files[1][key], files[0][key], rtol=1e-5, atol=1e-6)
    for lib in LIBS:  # a plain LoRA on the unchanged base gives the trained outputs
        plain = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine")
        torch.testing.assert_close(out(plain), trained, rtol=1e-4, atol=1e-5)


def _dtypes_and_grads(model: nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("quantized", [False, True])
def test_prepare_model_for_kbit_training(quantized):
    models = [tiny_hf(FAMILY).to(torch.bfloat16) for _ in LIBS]
    for lib, model in zip(LIBS, models, strict=True):
        if quantized:  # what a quantizer sets; the gradient-checkpointing branch runs
            model.is_loaded_in_4bit = True
        assert lib.prepare_model_for_kbit_training(model) is model
    assert _dtypes_and_grads(models[1]) == _dtypes_and_grads(models[0])
    assert {d for d, _ in _dtypes_and_grads(models[1]).values()} == {torch.float32}
    assert models[1].is_gradient_checkpointing == models[0].is_gradient_checkpointing == quantized


def test_cast_mixed_precision_params(base, tmp_path):
    theirs, mine = both(base, saved(tmp_path), is_trainable=True)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    for lib, model in ((peft, theirs), (ap, mine)):
        lib.cast_mixed_precision_params(model, torch.bfloat16)
    counts = [collections.Counter(_dtypes_and_grads(m).values()) for m in (theirs, mine)]
    assert counts[1] == counts[0]
    torch.testing.assert_close(out(mine), out(theirs), rtol=1e-2, atol=1e-2)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())  # untouched
    assert {p.dtype for p in base.parameters()} == {torch.float32}
