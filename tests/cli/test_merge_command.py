"""``adaptc merge MODEL ADAPTER --out DIR`` end to end through the console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import transformers as tf

import adaptc
from adaptc.cli import main
from tests.compiler.models import hf_inputs, tiny_hf


def _setup(tmp_path: Path):
    model = tiny_hf("llama").eval()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    spec = {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": {
        "targets": {"kind": "all-linear"}, "init": "random", "r": 4}}}  # fmt: skip
    new = adaptc.compile(model, spec).eval()
    adaptc.save_adapter(new, tmp_path / "adapter")
    return new


def test_merge_through_the_console_script(tmp_path):
    new = _setup(tmp_path)
    exe = Path(sys.executable).parent / "adaptc"
    proc = subprocess.run(
        [str(exe), "merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "merged of" in proc.stdout
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**hf_inputs("llama")).logits, new(**hf_inputs("llama")).logits,
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
    tokens = ("config.json", "generation_config.json", "model.safetensors.index.json")
    assert all((tmp_path / "out" / name).is_file() for name in tokens)


def test_existing_output_needs_force(tmp_path, capsys):
    _setup(tmp_path)
    (tmp_path / "out").mkdir()
    args = [
        "merge",
        str(tmp_path / "base"),
        str(tmp_path / "adapter"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--force", "--json"]) == 0
    assert '"merged":' in capsys.readouterr().out


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    _setup(tmp_path)
    other = tiny_hf("opt")
    other.save_pretrained(tmp_path / "opt")
    capsys.readouterr()
    cases = [
        ([str(tmp_path / "nope"), str(tmp_path / "adapter")], "no such file or directory"),
        ([str(tmp_path / "base"), str(tmp_path / "nope")], "no adapter directory"),
    ]
    for paths, message in cases:
        assert main(["merge", *paths, "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert not (tmp_path / "out").exists()
    args = [
        "merge",
        str(tmp_path / "opt"),
        str(tmp_path / "adapter"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 1  # an adapter made for another base
    err = capsys.readouterr().err.strip()
    assert "does not fit this model: LoRA tensors" in err, err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()
