"""``adaptc merge MODEL ADAPTER --out DIR`` end to end through the console script."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from torch import nn

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
    assert "adapter 'default', 14 merged, of 21 tensors in 2 shard(s)" in proc.stdout
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
    assert "does not fit this model (OPTForCausalLM): tensors" in err, err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()


def _peft_two_adapters(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A base checkpoint and peft's layout of two adapters: ``DIR/`` and ``DIR/second/``."""
    model = tiny_hf("opt").eval()
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    pm.add_adapter(
        "second", peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "multi")
    return pm.eval(), tmp_path / "multi"


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**hf_inputs("opt")).logits


def test_adapter_name_picks_the_sub_adapter_of_a_peft_directory(tmp_path, capsys):
    pm, multi = _peft_two_adapters(tmp_path)
    for name in ("second", "default", None):
        out = tmp_path / f"out-{name}"
        flag = [] if name is None else ["--adapter", name]
        assert main(["merge", str(tmp_path / "base"), str(multi), "--out", str(out), *flag]) == 0
        assert f"adapter '{name or 'default'}'" in capsys.readouterr().out
        pm.set_adapter(name or "default")
        merged = tf.AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(_logits(merged), _logits(pm), rtol=1e-5, atol=1e-5)


def test_an_unknown_adapter_name_is_refused_with_the_names_held(tmp_path, capsys):
    _, multi = _peft_two_adapters(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "base"), str(multi), "--out", str(out),
                 "--adapter", "third"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err == f"adaptc merge: error: {multi} has no adapter 'third' (has: default, second)\n"
    assert not out.exists()


def test_adapter_name_in_an_adaptc_directory(tmp_path, capsys):
    model = tiny_hf("opt").eval()
    model.save_pretrained(tmp_path / "base")
    alpha = {"targets": {"kind": "names", "names": ["q_proj"]}, "init": "random"}
    beta = {"targets": {"kind": "names", "names": ["fc1"]}, "init": "random", "r": 2}
    spec = {"version": 1, "adapters": {"alpha": alpha, "beta": beta}}
    new = adaptc.compile(model, spec).eval()
    adaptc.save_adapter(new, tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(out),
                 "--adapter", "beta"]) == 0  # fmt: skip
    adaptc.set_active(new, "beta")
    merged = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged), _logits(new), rtol=1e-5, atol=1e-5)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(out),
                 "--force", "--adapter", "gamma"]) == 1  # fmt: skip
    assert "has no adapter 'gamma' (has: alpha, beta)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"target_modules": ["q_proj"], "lora_bias": True},
            "adaptc merge: error: adapter 'default' ({adapter}/adapter_model.safetensors): "
            "model.layers.0.self_attn.q_proj has lora_bias but the layer has no bias, so the "
            "update cannot be merged into the checkpoint (peft refuses it too)",
        ),
        (
            {"target_modules": ["nonexistent"]},
            "adaptc merge: error: the adapter 'default' ({adapter}/adapter_model.safetensors) "
            "does not fit this model (LlamaForCausalLM): targets.names [nonexistent] matched "
            "no module of LlamaForCausalLM",
        ),
    ],
)
def test_user_errors_are_one_line_naming_adapter_and_module(tmp_path, capsys, config, message):
    model = tiny_hf("llama").eval()
    model.save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        targets = config["target_modules"]
        real = {**config, "target_modules": ["q_proj"]}
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="CAUSAL_LM", **real)
                            ).save_pretrained(adapter)  # fmt: skip
    saved = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**saved, "target_modules": targets}))
    capsys.readouterr()
    code = main(["merge", str(tmp_path / "base"), str(adapter), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(message.format(adapter=adapter)), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_a_non_finite_merge_is_one_line_and_writes_nothing(tmp_path, capsys):
    _setup(tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(path)
    key = next(k for k in sorted(state) if k.endswith("lora_B.weight"))
    state[key] = torch.full_like(state[key], float("inf"))
    save_file(state, path)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "out")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    target = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    assert err == (
        f"adaptc merge: error: merging adapter 'default' into {target} gives non-finite "
        "weights; the adapter seems broken\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
