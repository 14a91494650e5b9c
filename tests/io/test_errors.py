"""Bad adapters: one clear error naming the file or the keys, and nothing half-loaded."""

from __future__ import annotations

import copy
import os
import pickle
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptc
from adaptc.adapters.keys import AdapterKeyError
from adaptc.io import AdapterLoadError
from tests.compiler.models import tiny_hf

QV = {"kind": "names", "names": ["q_proj", "v_proj"]}


@pytest.fixture
def saved(tmp_path):
    model = tiny_hf("opt")
    peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj", "v_proj"])
    ).save_pretrained(str(tmp_path))
    return model, tmp_path


def _weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_missing_keys_are_named(saved):
    model, path = saved
    state = _weights(path)
    gone = sorted(state)[0]
    del state[gone]
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterKeyError, match=r"1 missing \(e\.g\. " + re.escape(gone)):
        adaptc.load_adapter(model, path)


def test_unexpected_keys_are_named(saved):
    model, path = saved
    state = _weights(path)
    state["base_model.model.model.decoder.layers.0.fc1.lora_A.weight"] = torch.zeros(8, 16)
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(
        AdapterKeyError, match=r"1 unexpected \(e\.g\. .*layers\.0\.fc1\.lora_A\.weight\)"
    ):
        adaptc.load_adapter(model, path)


def test_wrong_shape_names_key_and_shapes(saved):
    model, path = saved
    state = _weights(path)
    key = next(k for k in sorted(state) if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(3, 16)
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterKeyError, match=r"has shape \(3, 16\), the model expects \(8, 16\)"):
        adaptc.load_adapter(model, path)


def test_truncated_safetensors_file(saved):
    model, path = saved
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        AdapterLoadError, match=r"adapter_model\.safetensors is not a readable safetensors file"
    ):
        adaptc.load_adapter(model, path)


def test_garbage_safetensors_file(saved):
    model, path = saved
    (path / "adapter_model.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        adaptc.load_adapter(model, path)


def test_adapter_for_another_architecture(saved):
    _, path = saved
    with pytest.raises(
        AdapterLoadError,
        match=r"does not fit this model: targets\.names .* matched no module of GPT2LMHeadModel",
    ):
        adaptc.load_adapter(tiny_hf("gpt2"), path)


def test_missing_directory_and_missing_files(tmp_path):
    model = tiny_hf("opt")
    with pytest.raises(AdapterLoadError, match="no adapter directory at"):
        adaptc.load_adapter(model, tmp_path / "nope")
    with pytest.raises(AdapterLoadError, match=r"has no adapter_config\.json"):
        adaptc.load_adapter(model, tmp_path)


def test_weights_file_missing(saved):
    model, path = saved
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(
        AdapterLoadError, match=r"has neither adapter_model\.safetensors nor adapter_model\.bin"
    ):
        adaptc.load_adapter(model, path)


def test_hub_id_not_in_the_cache_says_offline(tmp_path):
    # the tests run with HF_HUB_OFFLINE=1 (tests/conftest.py); downloads: tests/test_hub.py
    with pytest.raises(AdapterLoadError) as info:
        adaptc.load_adapter(tiny_hf("opt"), "someone/not-cached", cache_dir=tmp_path)
    assert str(info.value) == (
        "the adapter someone/not-cached is not in the Hugging Face cache and HF_HUB_OFFLINE is "
        "set: download it where there is network (`hf download someone/not-cached`), or unset "
        "HF_HUB_OFFLINE"
    )


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_in_a_bin_file_is_refused(saved, monkeypatch, tmp_path):
    model, path = saved
    (path / "adapter_model.safetensors").unlink()
    with (path / "adapter_model.bin").open("wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterLoadError, match="never code"):
        adaptc.load_adapter(model, path)
    assert not (tmp_path / "PWNED").exists()


def test_invalid_adapter_config(saved):
    model, path = saved
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    with pytest.raises(AdapterLoadError, match=r"invalid adapter config .* r: must be > 0"):
        adaptc.load_adapter(model, path)


def test_nothing_half_loaded_on_error(saved):
    model, path = saved
    before = {n: p.clone() for n, p in model.named_parameters()}
    state = _weights(path)
    del state[sorted(state)[-1]]
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterKeyError):
        adaptc.load_adapter(model, path)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_save_into_a_new_directory_is_whole_or_nothing(tmp_path, monkeypatch):
    new = adaptc.compile(tiny_hf("opt"), {"version": 1, "adapters": {"default": {"targets": QV}}})
    import adaptc.io.save as save_mod

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        adaptc.save_adapter(new, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_save_into_an_existing_directory_keeps_other_files(tmp_path):
    new = adaptc.compile(tiny_hf("opt"), {"version": 1, "adapters": {"default": {"targets": QV}}})
    (tmp_path / "optimizer.pt").write_bytes(b"trainer state")
    adaptc.save_adapter(new, tmp_path)
    assert (tmp_path / "optimizer.pt").read_bytes() == b"trainer state"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adaptc_spec.yaml",
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
    ]


def test_save_needs_a_compiled_model(tmp_path):
    with pytest.raises(
        ValueError, match=r"save_adapter\(\) takes a model returned by adaptc\.compile"
    ):
        adaptc.save_adapter(tiny_hf("opt"), tmp_path)
