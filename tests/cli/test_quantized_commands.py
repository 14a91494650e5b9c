"""The CLI on a base the spec declares quantized (``base_model.quantization``): compile
loads it quantized, plan estimates QLoRA memory on the meta device (a 70B 4-bit plan),
merge streams a float checkpoint of the dequantized weights plus the update."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import adaptc
from adaptc.cli import main
from tests.cli.test_plan import LLAMA_70B
from tests.compiler.models import save_llama

pytest.importorskip("bitsandbytes")

QUANTIZATION = {"method": "bitsandbytes", "bits": 4, "quant_type": "nf4", "double_quant": True}
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3]])


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama"))


def write_spec(path: Path, model: Path | str, **quantization) -> Path:
    spec = {"version": 1, "task_type": "CAUSAL_LM",
            "base_model": {"name": str(model), "quantization": {**QUANTIZATION, **quantization}},
            "adapters": {"default": {"r": 4, "init": "random", "targets": {
                "kind": "names", "names": ["q_proj", "v_proj"]}}}}  # fmt: skip
    path.write_text(json.dumps(spec))
    return path


def test_compile_loads_the_base_quantized(capsys, checkpoint, tmp_path):
    spec = write_spec(tmp_path / "spec.json", checkpoint)
    code, out, _ = run(capsys, "compile", spec, "--out", tmp_path / "adapter")
    assert code == 0
    assert out.startswith(
        f"{checkpoint}: LlamaForCausalLM (fp32, bitsandbytes 4-bit nf4, double quant)"
    )
    assert "model.layers.0.self_attn.q_proj  bnb.Linear4bit" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    code, out, _ = run(capsys, "compile", spec, "--json")
    doc = json.loads(out)
    assert doc["quantization"]["bits"] == 4 and doc["quantization"]["quant_type"] == "nf4"


def test_a_config_alone_cannot_be_loaded_quantized(capsys, checkpoint, tmp_path):
    spec = write_spec(tmp_path / "spec.json", checkpoint / "config.json")
    code, out, err = run(capsys, "compile", spec)
    assert (code, out) == (1, "")
    assert err == (
        f"adaptc compile: error: {checkpoint / 'config.json'}: bitsandbytes 4-bit nf4, double "
        "quant quantizes weights while loading a checkpoint; give a model directory or hub id\n"
    )


def test_plan_estimates_qlora_memory_for_70b(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    spec = write_spec(tmp_path / "spec.json", tmp_path, compute_dtype="bf16")
    doc = json.loads(run(capsys, "plan", spec, "--json")[1])
    linear = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    # embeddings, head, norms and the rotary buffers (2 × 64 frequencies), in bf16
    others = (2 * 32000 * 8192 + 81 * 2 * 8192 - 8192 + 2 * 64) * 2
    adapter = doc["plan"]["adapter_params"]
    expected = int(linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8) + others + adapter * 4
    assert doc["memory"]["quantization"] == "bitsandbytes 4-bit nf4, double quant"
    assert doc["memory"]["qlora"]["weights"] == pytest.approx(expected, abs=8)
    assert doc["memory"]["qlora"]["weights"] < doc["memory"]["lora"]["weights"] / 3.5
    assert doc["memory"]["qlora"]["optimizer"] == doc["memory"]["lora"]["optimizer"]
    code, out, _ = run(capsys, "plan", spec)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("LoRA, base bitsandbytes"))
    assert row.split()[7:9] == [f"{expected / 2**30:,.2f}", "GiB"]  # the weights: ≈ 33.9 GiB


def test_merge_writes_the_dequantized_weights_plus_the_update(capsys, checkpoint, tmp_path):
    spec = write_spec(tmp_path / "spec.json", checkpoint)
    assert run(capsys, "compile", spec, "--out", tmp_path / "adapter")[0] == 0
    code, out, _ = run(capsys, "merge", checkpoint, tmp_path / "adapter", "--out", tmp_path / "m")
    assert code == 0
    assert "2 merged, 5 dequantized, of 12 tensors" in out
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tf.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config)
        trained = adaptc.load_adapter(base, tmp_path / "adapter")
        merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, trained(IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_requantizing_spec_gets_a_quantized_checkpoint(capsys, checkpoint, tmp_path):
    spec = write_spec(tmp_path / "spec.json", checkpoint, merge="requantize")
    assert run(capsys, "compile", spec, "--out", tmp_path / "adapter")[0] == 0
    code, out, _ = run(capsys, "merge", checkpoint, tmp_path / "adapter", "--out", tmp_path / "m")
    assert code == 0
    assert "(requantized: the largest error 0.0" in out and "model.layers.0.self_attn" in out
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="cpu")
        base = tf.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config)
        expected = adaptc.merge(adaptc.load_adapter(base, tmp_path / "adapter"))
    assert type(saved.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        torch.testing.assert_close(saved(IDS).logits, expected(IDS).logits, rtol=0, atol=0)


def test_other_backends_requantized_checkpoints_are_refused(capsys, checkpoint, tmp_path):
    pytest.importorskip("torchao")
    spec = write_spec(tmp_path / "spec.json", checkpoint, merge="requantize")
    doc = json.loads(spec.read_text())
    doc["base_model"]["quantization"] = {"method": "torchao", "scheme": "int8_weight_only",
                                         "merge": "requantize"}  # fmt: skip
    spec.write_text(json.dumps(doc))
    assert run(capsys, "compile", spec, "--out", tmp_path / "adapter")[0] == 0
    code, out, err = run(capsys, "merge", checkpoint, tmp_path / "adapter", "--out", tmp_path / "m")
    assert (code, out) == (1, "")
    assert err == (
        "adaptc merge: error: a requantized torchao checkpoint cannot be written yet "
        "(bitsandbytes only); set merge: dequantize for a float checkpoint\n"
    )
    assert not (tmp_path / "m").exists()


def test_merge_writes_the_dtype_the_spec_asks(capsys, checkpoint, tmp_path):
    spec = write_spec(tmp_path / "spec.json", checkpoint, merge_dtype="bf16")
    assert run(capsys, "compile", spec, "--out", tmp_path / "adapter")[0] == 0
    merge = ["merge", checkpoint, tmp_path / "adapter", "--out"]
    assert run(capsys, *merge, tmp_path / "m")[0] == 0
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert run(capsys, *merge, tmp_path / "m32", "--dtype", "fp32")[0] == 0  # the flag wins
    exact = load_file(tmp_path / "m32" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert exact[key].dtype == torch.float32
    torch.testing.assert_close(tensors[key].float(), exact[key], rtol=2**-8, atol=1e-6)
