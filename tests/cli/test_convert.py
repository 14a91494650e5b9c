"""``adaptc convert``: spec → PEFT config and back, on files."""

from __future__ import annotations

import json

from peft import LoraConfig

from adaptc.cli import main
from adaptc.spec import load_spec
from tests.conftest import EXAMPLES


def test_spec_to_peft_on_stdout(capsys):
    assert main(["convert", str(EXAMPLES / "seed-opt-350m.yaml")]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["peft_type"] == "LORA"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)


def test_spec_to_peft_file_is_read_by_peft(tmp_path, capsys):
    out = tmp_path / "adapter_config.json"
    assert main(["convert", str(EXAMPLES / "seed-mt0-large.yaml"), "-o", str(out)]) == 0
    config = LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.1)
    assert config.task_type == "SEQ_2_SEQ_LM"


def test_peft_to_spec_round_trip(tmp_path, capsys):
    LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], use_dora=True).save_pretrained(
        str(tmp_path)
    )
    out = tmp_path / "spec.yaml"
    assert main(["convert", str(tmp_path), "-o", str(out)]) == 0
    spec = load_spec(out)
    a = spec.adapter()
    assert (a.r, a.lora_alpha, a.use_dora) == (4, 8, True)
    json_out = tmp_path / "spec.json"
    assert main(["convert", str(tmp_path / "adapter_config.json"), "-o", str(json_out)]) == 0
    assert load_spec(json_out) == spec


def test_multi_adapter_spec_needs_a_choice_or_a_directory(tmp_path, capsys):
    spec = EXAMPLES / "multi-adapter-shared.yaml"
    assert main(["convert", str(spec)]) == 1
    assert "spec has 2 adapters (summarise, translate)" in capsys.readouterr().err
    assert main(["convert", str(spec), "--adapter", "translate"]) == 0
    assert json.loads(capsys.readouterr().out)["r"] == 16
    assert main(["convert", str(spec), "--out", str(tmp_path) + "/"]) == 0
    for name in ("summarise", "translate"):  # PEFT's layout: non-default adapters in folders
        assert LoraConfig.from_pretrained(str(tmp_path / name)).target_modules == {
            "q_proj",
            "v_proj",
        }


def test_unknown_adapter_and_types_selector_errors(capsys):
    assert main(["convert", str(EXAMPLES / "seed-opt-350m.yaml"), "--adapter", "x"]) == 1
    assert "no adapter 'x'" in capsys.readouterr().err
    assert main(["convert", str(EXAMPLES / "gpt2-conv1d-types.yaml")]) == 1
    assert "no PEFT equivalent" in capsys.readouterr().err


def test_invalid_input_prints_located_errors(write, capsys):
    bad = write("bad.yaml", "version: 1\nadapters:\n  a: {r: 0}\n")
    assert main(["convert", str(bad)]) == 1
    assert capsys.readouterr().err.strip() == f"{bad}:3:10: adapters.a.r: must be > 0, got 0"
