"""Adapter directories as peft writes them: read by every entry point, and written back so
that peft's own tools (``AutoPeftModel``) find what they need."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch

import adaptc
from adaptc.cli import main
from adaptc.io import AdapterLoadError
from adaptc.peft import PeftModel
from tests.compiler.models import hf_inputs, tiny_hf


@pytest.fixture
def seq_cls_dir(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """peft's SEQ_CLS adapter: its config lists ``["classifier", "classifier", "score"]``."""
    model = tiny_hf("bert").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"],
                            modules_to_save=["classifier"], init_lora_weights=False),
        )  # fmt: skip
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.normal_()
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "classifier", "score"]
    return pm.eval(), tmp_path / "adapter"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**hf_inputs("bert")).logits


def test_duplicated_task_heads_load_everywhere(seq_cls_dir, tmp_path, capsys):
    pm, directory = seq_cls_dir
    base = tiny_hf("bert").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = adaptc.load_adapter(base, directory).eval()
    assert not [w for w in caught if "score" in str(w.message)]  # peft ignores it too
    torch.testing.assert_close(_logits(ours), _logits(pm), rtol=1e-6, atol=1e-6)
    facade = PeftModel.from_pretrained(tiny_hf("bert"), directory).eval()
    torch.testing.assert_close(_logits(facade), _logits(pm), rtol=1e-6, atol=1e-6)
    spec = adaptc.load_spec(directory / "adapter_config.json")
    assert spec.adapters["default"].modules_to_save == ("classifier", "score")
    capsys.readouterr()
    assert main(["convert", str(directory / "adapter_config.json"), "--format", "json"]) == 0
    converted = json.loads(capsys.readouterr().out)
    assert converted["adapters"]["default"]["modules_to_save"] == ["classifier", "score"]


def test_adaptc_directory_reloads_from_its_peft_config_alone(seq_cls_dir, tmp_path):
    pm, directory = seq_cls_dir
    ours = adaptc.load_adapter(tiny_hf("bert"), directory)
    adaptc.save_adapter(ours, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["classifier", "score", "classifier", "score"]
    (tmp_path / "again" / "adaptc_spec.yaml").unlink()  # as another tool would copy it
    again = adaptc.load_adapter(tiny_hf("bert"), tmp_path / "again").eval()
    torch.testing.assert_close(_logits(again), _logits(pm), rtol=1e-6, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(tiny_hf("bert"), tmp_path / "again").eval()
    torch.testing.assert_close(_logits(theirs), _logits(pm), rtol=1e-6, atol=1e-6)


def test_the_base_model_is_recorded_for_auto_peft_model(tmp_path):
    model = tiny_hf("opt")
    model.save_pretrained(tmp_path / "base")
    import transformers as tf

    base = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    spec = {"version": 1, "task_type": "CAUSAL_LM",
            "adapters": {"default": {"init": "random", "r": 2}}}  # fmt: skip
    new = adaptc.compile(base, spec).eval()
    adaptc.save_adapter(new, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**hf_inputs("opt")).logits, new(**hf_inputs("opt")).logits,
            rtol=1e-6, atol=1e-6,
        )  # fmt: skip
    plain = adaptc.compile(tiny_hf("opt"), spec)  # built from a config: nothing to record
    adaptc.save_adapter(plain, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None


def test_a_directory_of_named_adapters_says_which_it_holds(tmp_path):
    model = tiny_hf("opt")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"]),
                             adapter_name="alpha")  # fmt: skip
    pm.add_adapter("beta", peft.LoraConfig(target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "dir", selected_adapters=["alpha", "beta"])
    assert not (tmp_path / "dir" / "adapter_config.json").exists()
    with pytest.raises(AdapterLoadError) as info:
        adaptc.load_adapter(model, tmp_path / "dir")
    assert str(info.value) == (
        f"{tmp_path / 'dir'} has no adapter_config.json at its top; it holds the adapters "
        f"alpha, beta in sub-directories: load one by its directory, e.g. {tmp_path / 'dir/alpha'}"
    )
    loaded = adaptc.load_adapter(model, tmp_path / "dir" / "alpha", adapter_name="alpha")
    assert adaptc.adapter_names(loaded) == ("alpha",)
