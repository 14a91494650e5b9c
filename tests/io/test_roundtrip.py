"""PEFT's adapter files, both ways: adaptc saves → peft loads; peft saves → adaptc loads."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import adaptc
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor, peft_config, share_adapter_weights

TOL = {"rtol": 1e-6, "atol": 1e-6}
TARGETS = {
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
}
OPTIONS = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "dora": {"r": 4, "use_dora": True},
    "patterns": {"r": 2, "rank_pattern": {"v.*": 5}, "alpha_pattern": {"q.*": 3}},
    "modules_to_save": {"r": 2},  # with a task head saved, see _spec
}
CASES = [(f, o) for f in TARGETS for o in OPTIONS]


def _spec(family: str, option: str) -> dict:
    adapter = {"targets": {"kind": "names", "names": TARGETS[family]}, **OPTIONS[option]}
    data = {"version": 1, "adapters": {"default": adapter}}
    if option == "modules_to_save":
        head = {"opt": "lm_head", "gpt2": "wpe", "llama": "lm_head", "mt5": "lm_head"}
        if family == "bert":
            data["task_type"] = "SEQ_CLS"  # PEFT saves the classifier for this task
        else:
            adapter["modules_to_save"] = [head[family]]
    return data


def _pair(family: str, option: str):
    model = tiny_hf(family).eval()
    spec = adaptc.load_spec(_spec(family, option))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    ours = adaptc.compile(model, spec)
    share_adapter_weights(theirs, ours)
    with torch.no_grad():  # saved modules: both copies get the same new values
        for name, p in theirs.named_parameters():
            if "modules_to_save.default" in name:
                p.add_(0.5)
        for name, p in ours.named_parameters():
            if "modules_to_save.default" in name:
                p.add_(0.5)
    return model, theirs.eval(), ours.eval()


def _out(model, family):
    with torch.no_grad():
        return output_tensor(model(**hf_inputs(family)))


@pytest.mark.parametrize(("family", "option"), CASES)
def test_peft_loads_what_adaptc_saves(family, option, tmp_path):
    model, _, ours = _pair(family, option)
    adaptc.save_adapter(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_out(loaded, family), _out(ours, family), **TOL)


@pytest.mark.parametrize(("family", "option"), CASES)
def test_adaptc_loads_what_peft_saves(family, option, tmp_path):
    model, theirs, _ = _pair(family, option)
    theirs.save_pretrained(str(tmp_path))
    loaded = adaptc.load_adapter(model, tmp_path).eval()
    torch.testing.assert_close(_out(loaded, family), _out(theirs, family), **TOL)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference, as peft


@pytest.mark.parametrize(("family", "option"), CASES)
def test_files_are_the_same_as_peft_writes(family, option, tmp_path):
    _, theirs, ours = _pair(family, option)
    theirs.save_pretrained(str(tmp_path / "peft"))
    adaptc.save_adapter(ours, tmp_path / "adaptc")
    a = load_file(str(tmp_path / "adaptc" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    ours_cfg = json.loads((tmp_path / "adaptc" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for cfg in (ours_cfg, theirs_cfg):  # sets are written in arbitrary order by peft
        for key in ("target_modules", "modules_to_save"):
            if isinstance(cfg[key], list):
                cfg[key] = sorted(cfg[key])
    assert ours_cfg == theirs_cfg


def test_trainable_load_keeps_adapter_weights_trainable(tmp_path):
    model, theirs, _ = _pair("llama", "plain")
    theirs.save_pretrained(str(tmp_path))
    loaded = adaptc.load_adapter(model, tmp_path, trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_all_linear_saves_resolved_paths_as_peft_does(tmp_path):
    model = tiny_hf("opt")
    data = {"version": 1, "adapters": {"default": {"targets": {"kind": "all-linear"}, "r": 2}}}
    ours = adaptc.compile(model, data)
    adaptc.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    reference = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=2)
    )
    assert sorted(cfg["target_modules"]) == sorted(reference.peft_config["default"].target_modules)
    peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))


def test_types_selector_round_trips_through_peft(tmp_path):
    model = tiny_hf("gpt2").eval()
    data = {
        "version": 1,
        "adapters": {
            "default": {
                "targets": {"kind": "types", "types": ["transformers.Conv1D"]},
                "init": "random",
            }
        },
    }
    ours = adaptc.compile(model, data).eval()
    adaptc.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    torch.testing.assert_close(_out(loaded, "gpt2"), _out(ours, "gpt2"), **TOL)


def test_several_adapters_in_peft_layout(tmp_path):
    model = tiny_hf("opt").eval()
    qv = {"kind": "names", "names": ["q_proj", "v_proj"]}
    data = {
        "version": 1,
        "adapters": {
            "default": {"targets": qv, "init": "random"},
            "other": {"targets": qv, "r": 2, "init": "random"},
        },
    }
    ours = adaptc.compile(model, data).eval()
    adaptc.save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adaptc_spec.yaml").is_file()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    loaded.set_adapter("other")
    adaptc.set_active(ours, "other")
    torch.testing.assert_close(_out(loaded, "opt"), _out(ours, "opt"), **TOL)
    back = adaptc.load_adapter(model, tmp_path).eval()  # the adaptc spec brings both back
    adaptc.set_active(back, "other")
    torch.testing.assert_close(_out(back, "opt"), _out(ours, "opt"), **TOL)


def test_legacy_bin_adapter_loads_with_weights_only(tmp_path):
    model, theirs, _ = _pair("opt", "plain")
    theirs.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    loaded = adaptc.load_adapter(model, tmp_path).eval()
    torch.testing.assert_close(_out(loaded, "opt"), _out(theirs, "opt"), **TOL)


def test_hub_id_resolves_through_the_local_cache(tmp_path):
    model, theirs, _ = _pair("opt", "plain")
    theirs.save_pretrained(str(tmp_path / "saved"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--opt-lora"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in (tmp_path / "saved").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = adaptc.load_adapter(model, "someone/opt-lora", cache_dir=tmp_path / "cache").eval()
    torch.testing.assert_close(_out(loaded, "opt"), _out(theirs, "opt"), **TOL)


def test_original_model_untouched_by_load(tmp_path):
    model, theirs, _ = _pair("opt", "plain")
    theirs.save_pretrained(str(tmp_path))
    before = {n: (id(p), p.clone()) for n, p in model.named_parameters()}
    adaptc.load_adapter(model, tmp_path)
    after = {n: (id(p), p) for n, p in model.named_parameters()}
    assert before.keys() == after.keys()
    for n in before:
        assert before[n][0] == after[n][0] and torch.equal(before[n][1], after[n][1])


def test_loading_an_adapter_with_embedding_base_weights_leaves_the_original(tmp_path):
    model = tiny_hf("opt")
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"])
    )
    with torch.no_grad():
        theirs.base_model.model.model.decoder.embed_tokens.base_layer.weight.add_(1.0)
    theirs.save_pretrained(str(tmp_path))
    before = model.model.decoder.embed_tokens.weight.clone()
    loaded = adaptc.load_adapter(model, tmp_path).eval()
    assert torch.equal(model.model.decoder.embed_tokens.weight, before)
    torch.testing.assert_close(_out(loaded, "opt"), _out(theirs.eval(), "opt"), **TOL)


def test_saving_some_adapters_writes_a_spec_of_those(tmp_path):
    model = tiny_hf("opt").eval()
    qv = {"kind": "names", "names": ["q_proj", "v_proj"]}
    data = {"version": 1, "adapters": {"default": {"targets": qv}, "other": {"targets": qv}}}
    ours = adaptc.compile(model, data)
    adaptc.save_adapter(ours, tmp_path, adapters=["default"])
    assert list(adaptc.load_spec(tmp_path / "adaptc_spec.yaml").adapters) == ["default"]
    adaptc.load_adapter(model, tmp_path)
