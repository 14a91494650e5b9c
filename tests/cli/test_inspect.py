"""``adaptc inspect MODEL``: layer types, target names with counts, PEFT's default targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adaptc.cli import main
from tests.test_models import fake_hub_cache, save_tiny


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    paths = {kind: save_tiny(kind, root / kind) for kind in ("opt", "llama", "gpt2", "bert")}
    paths["cache"] = fake_hub_cache(root / "hub", "org/tiny-bert", paths["bert"])
    return paths


def test_inspect_llama_lists_types_target_names_and_peft_defaults(capsys, ckpt):
    code, out, err = run(capsys, "inspect", ckpt["llama"])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:5] == [
        f"model: {ckpt['llama']}",
        "class: LlamaForCausalLM  model_type: llama  task_type: CAUSAL_LM",
        "parameters: 6,736",
        "PEFT's default targets: q_proj, v_proj",
        "output head (left out of all-linear): lm_head",
    ]
    assert "  Linear ×15" in lines and "  LlamaDecoderLayer ×2" in lines
    targets = lines[lines.index("target names (kind: names):") + 1 :]
    rows = [line.split() for line in targets]
    assert ["q_proj", "×2", "nn.Linear", "16→16"] in rows
    assert ["k_proj", "×2", "nn.Linear", "16→8"] in rows
    assert ["down_proj", "×2", "nn.Linear", "32→16"] in rows
    assert ["lm_head", "×1", "nn.Linear", "16→64"] in rows
    assert ["embed_tokens", "×1", "nn.Embedding", "64→16"] in rows


def test_inspect_gpt2_shows_conv1d_and_its_fused_attention(capsys, ckpt):
    code, out, _ = run(capsys, "inspect", ckpt["gpt2"], "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["model_class"], doc["model_type"]) == ("GPT2LMHeadModel", "gpt2")
    assert doc["peft_default_targets"] == ["c_attn"]
    c_attn = next(t for t in doc["targets"] if t["name"] == "c_attn")
    assert c_attn == {
        "name": "c_attn",
        "count": 2,
        "type": "transformers.Conv1D",
        "shapes": [[16, 48]],
    }
    c_proj = next(t for t in doc["targets"] if t["name"] == "c_proj")
    assert c_proj["count"] == 4 and c_proj["shapes"] == [[16, 16], [64, 16]]


def test_inspect_bert_from_the_cache_and_with_a_task_head(capsys, ckpt):
    code, out, _ = run(capsys, "inspect", "org/tiny-bert", "--cache-dir", ckpt["cache"], "--json")
    doc = json.loads(out)
    assert (code, doc["model_class"], doc["task_type"]) == (0, "BertModel", None)
    assert doc["peft_default_targets"] == ["query", "value"]
    assert {"name": "query", "count": 2, "type": "nn.Linear", "shapes": [[16, 16]]} in doc[
        "targets"
    ]
    code, out, _ = run(capsys, "inspect", ckpt["bert"], "--task-type", "SEQ_CLS", "--json")
    doc = json.loads(out)
    assert doc["model_class"] == "BertForSequenceClassification"
    assert any(t["name"] == "classifier" for t in doc["targets"])


def test_inspect_a_config_json_alone(capsys, ckpt):
    code, out, _ = run(capsys, "inspect", ckpt["opt"] / "config.json", "--json")
    doc = json.loads(out)
    assert (code, doc["model_class"], doc["parameters"]) == (0, "OPTForCausalLM", 6048)
    assert doc["layer_types"][0] == {"type": "Linear", "count": 13}


def test_inspect_a_model_without_peft_defaults(capsys):
    code, out, _ = run(capsys, "inspect", "tests.compiler.models:NestedMLP")
    assert code == 0
    assert "PEFT's default targets: - (none for this model type: set targets)" in out
    assert "class: NestedMLP  model_type: -  task_type: -" in out
    assert out.splitlines()[-3:] == [
        "  fc1   ×3  nn.Linear  12→24",
        "  fc2   ×3  nn.Linear  24→12",
        "  head  ×1  nn.Linear  12→3",
    ]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no/such/dir", "no such file or directory: no/such/dir"),
        ("org/absent", "the model org/absent is not in the Hugging Face cache and HF_HUB_OFFLINE"),
        (
            "tests.test_models:not_a_model",
            "the model factory tests.test_models:not_a_model returned",
        ),
        ("tests:nothing", "module 'tests' has no attribute 'nothing'"),
    ],
)
def test_inspect_errors_are_one_line(capsys, model, message):
    code, out, err = run(capsys, "inspect", model)
    assert (code, out) == (1, "")
    assert err.startswith(f"adaptc inspect: error: {message}") and err.count("\n") == 1


def test_console_script_finds_a_factory_in_the_working_directory(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), "
        "torch.nn.Linear(8, 2))\n"
    )
    exe = shutil.which("adaptc", path=str(Path(sys.executable).parent))
    assert exe is not None
    proc = subprocess.run(
        [exe, "inspect", "my_models:build", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["parameters"] == 4 * 8 + 8 + 8 * 2 + 2
    assert [(t["name"], t["shapes"]) for t in doc["targets"]] == [("0", [[4, 8]]), ("2", [[8, 2]])]
