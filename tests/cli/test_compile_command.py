"""``adaptc compile SPEC [MODEL]``: real weights in, PEFT's line out, the adapter on disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import adaptc
from adaptc.cli import main
from tests.conftest import ROOT
from tests.test_models import HASH, fake_hub_cache, save_tiny

QV = """\
version: 1
task_type: CAUSAL_LM
adapters:
  default:
    r: 8
    lora_alpha: 16
    targets: {kind: names, names: [q_proj, v_proj]}
"""


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def console(*argv: object, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The installed ``adaptc`` script (next to this interpreter), in a fresh process."""
    exe = shutil.which("adaptc", path=str(Path(sys.executable).parent))
    assert exe is not None
    return subprocess.run(
        [exe, *map(str, argv)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compile")
    paths = {kind: save_tiny(kind, root / kind) for kind in ("opt", "llama", "bert")}
    paths["sharded"] = save_tiny("llama", root / "sharded", max_shard_size="20KB")
    paths["cache"] = fake_hub_cache(root / "hub", "org/tiny-llama", paths["llama"])
    return paths


@pytest.fixture
def spec(write) -> Path:
    return write("spec.yaml", QV)


def test_compile_prints_plan_and_peft_line_and_writes_a_peft_adapter(capsys, ckpt, spec, tmp_path):
    out_dir = tmp_path / "adapter"
    code, out, err = run(capsys, "compile", spec, ckpt["opt"], "--out", out_dir)
    assert code == 0 and err == f"wrote {out_dir}\n"
    lines = out.splitlines()
    assert lines[0] == f"{ckpt['opt']}: OPTForCausalLM (fp32)"
    assert "4 adapted modules, 1,024 adapter params; trainable 1,024 of 7,072" in lines
    base = tf.AutoModelForCausalLM.from_pretrained(ckpt["opt"])
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    assert lines[-1] == capsys.readouterr().out.strip()  # PEFT's own line, to the digit
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "README.md",
        "adaptc_spec.yaml",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (8, 16, "CAUSAL_LM")
    weights = load_file(out_dir / "adapter_model.safetensors")
    key = "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight"
    assert len(weights) == 8 and torch.count_nonzero(weights[key]) == 0  # B starts at zero
    # peft reads it back onto the checkpoint
    loaded = peft.PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_pretrained(ckpt["opt"]), out_dir
    )
    a_key = key.replace("lora_B", "lora_A")
    state = loaded.state_dict()
    assert torch.equal(state[a_key.replace(".weight", ".default.weight")], weights[a_key])


def test_sharded_checkpoint_in_bf16(capsys, ckpt, spec):
    code, out, _ = run(capsys, "compile", spec, ckpt["sharded"], "--dtype", "bf16", "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["model_class"], doc["dtype"]) == ("LlamaForCausalLM", "bf16")
    assert (
        doc["trainable_params"]
        == doc["plan"]["trainable_params"]
        == 2 * (8 * 16 + 16 * 8 + 8 * 16 + 8 * 8)
    )
    assert doc["all_params"] == doc["plan"]["total_params"]
    assert doc["trainable_line"].startswith("trainable params: 896 || all params: ")


def test_model_defaults_to_the_specs_base_model(capsys, ckpt, write):
    spec = write(
        "spec.yaml", QV.replace("version: 1\n", f"version: 1\nbase_model:\n  name: {ckpt['opt']}\n")
    )
    code, out, _ = run(capsys, "compile", spec, "--quiet")
    assert (code, out) == (
        0,
        "trainable params: 1,024 || all params: 7,072 || trainable%: 14.4796\n",
    )


def test_base_model_revision_is_read_from_the_cache(capsys, ckpt, write):
    head = f"version: 1\nbase_model:\n  name: org/tiny-llama\n  revision: {HASH}\n"
    spec = write("spec.yaml", QV.replace("version: 1\n", head))
    code, out, err = run(capsys, "compile", spec, "--cache-dir", ckpt["cache"], "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["model"] == "org/tiny-llama"
    spec.write_text(spec.read_text().replace(HASH, "v9"))
    code, out, err = run(capsys, "compile", spec, "--cache-dir", ckpt["cache"])
    assert (code, out) == (1, "")
    assert err.startswith("adaptc compile: error: the model org/tiny-llama@v9 is not in the ")
    assert "HF_HUB_OFFLINE is set" in err and err.count("\n") == 1


def test_a_new_task_head_is_a_warning_line(capsys, ckpt, write):
    spec = write("cls.yaml", QV.replace("CAUSAL_LM", "SEQ_CLS").replace("q_proj, v_proj", "query"))
    code, out, _ = run(capsys, "compile", spec, ckpt["bert"])
    assert code == 0
    assert out.splitlines()[0] == f"{ckpt['bert']}: BertForSequenceClassification (fp32)"
    assert (
        f"warning: {ckpt['bert']}: weights not in the checkpoint, initialised at random: "
        "classifier.bias, classifier.weight"
    ) in out.splitlines()


def test_custom_factory_model(capsys, write, tmp_path):
    spec = write("dummy.yaml", QV.replace("task_type: CAUSAL_LM\n", ""))
    code, out, _ = run(
        capsys, "compile", spec, "tests.test_models:tiny_llama", "--out", tmp_path / "a"
    )
    assert code == 0 and out.splitlines()[-1].startswith("trainable params: 896 || all params:")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give MODEL: {spec} has no base_model.name"),
        (["no/such/model"], "no such file or directory: no/such/model"),
        (["org/absent"], "the model org/absent is not in the Hugging Face cache and HF_HUB"),
        (["tests.test_models:broken_factory"], "the model factory tests.test_models:broken_"),
        (["{config}"], "targets.names [query_proj] matched no module of OPTForCausalLM"),
    ],
)
def test_errors_are_one_line_exit_1_and_write_nothing(capsys, ckpt, write, tmp_path, argv, message):
    spec = write("spec.yaml", QV.replace("[q_proj, v_proj]", "[query_proj]"))
    config = ckpt["opt"] / "config.json"
    argv = [a.format(config=config) for a in argv]
    code, out, err = run(capsys, "compile", spec, *argv, "--out", tmp_path / "out")
    assert (code, out) == (1, "")
    assert err.startswith(f"adaptc compile: error: {message.format(spec=spec)}")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_merge_true_with_out_is_refused_before_loading(capsys, ckpt, write, tmp_path):
    spec = write("m.yaml", QV + "merge: true\n")
    code, _, err = run(capsys, "compile", spec, ckpt["opt"], "--out", tmp_path / "out")
    assert code == 1 and "has merge: true" in err and not (tmp_path / "out").exists()
    code, out, _ = run(capsys, "compile", spec, ckpt["opt"])
    assert code == 0 and "adapters merged into the weights" in out.splitlines()[0]


def test_the_original_checkpoint_stays_as_it_was(capsys, ckpt, spec, tmp_path):
    before = {p.name: p.read_bytes() for p in ckpt["opt"].iterdir()}
    run(capsys, "compile", spec, ckpt["opt"], "--out", tmp_path / "a")
    assert {p.name: p.read_bytes() for p in ckpt["opt"].iterdir()} == before


def test_console_script_end_to_end(ckpt, spec, tmp_path):
    """The installed script on a real checkpoint, quiet stderr off a TTY, a clean error."""
    proc = console("compile", spec, ckpt["llama"], "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("trainable params: 896 || all params: ")
    assert proc.stderr == f"wrote {tmp_path / 'a'}\n"  # no progress bar: stderr is not a TTY
    base = tf.AutoModelForCausalLM.from_pretrained(ckpt["llama"])
    again = adaptc.load_adapter(base, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert len(saved) == 8 and adaptc.trainable_parameters(again)[1] > sum(
        t.numel() for t in saved.values()
    )
    proc = console("compile", spec, tmp_path / "missing")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (
        f"adaptc compile: error: no such file or directory: {tmp_path / 'missing'}\n"
    )
