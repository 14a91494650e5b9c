"""``adaptc plan SPEC MODEL`` (meta device, no weight read) and ``adaptc validate --model``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf

from adaptc.cli import main
from tests.conftest import ROOT
from tests.test_models import CONFIGS, fake_hub_cache, save_tiny

QV = """\
version: 1
task_type: CAUSAL_LM
adapters:
  default:
    r: 8
    lora_alpha: 16
    targets: {kind: names, names: [q_proj, v_proj]}
"""
NO_MATCH = QV.replace("[q_proj, v_proj]", "[query_proj]")
LLAMA_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "dtype": "bfloat16",
}
ALL_LINEAR = {
    "version": 1,
    "task_type": "CAUSAL_LM",
    "adapters": {"default": {"r": 16, "lora_alpha": 32, "targets": {"kind": "all-linear"}}},
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    paths = {kind: save_tiny(kind, root / kind) for kind in ("opt", "gpt2")}
    paths["sharded"] = save_tiny("opt", root / "sharded", max_shard_size="20KB")
    paths["cache"] = fake_hub_cache(root / "hub", "org/tiny-opt", paths["opt"])
    return paths


@pytest.fixture
def spec(write) -> Path:
    return write("spec.yaml", QV)


def test_plan_prints_table_totals_peft_line_and_memory(capsys, ckpt, spec):
    code, out, err = run(capsys, "plan", spec, ckpt["opt"])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{ckpt['opt']}: OPTForCausalLM (meta device, no weight read)"
    assert lines[1].split() == [
        "adapter",
        "module",
        "type",
        "in",
        "out",
        "r",
        "alpha",
        "scaling",
        "params",
    ]
    assert lines[3].split() == [
        "default",
        "model.decoder.layers.0.self_attn.v_proj",
        "nn.Linear",
        "16",
        "16",
        "8",
        "16",
        "2",
        "256",
    ]
    assert "4 adapted modules, 1,024 adapter params; trainable 1,024 of 7,072" in lines
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["opt"]())
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() in lines  # PEFT's own line, to the digit
    assert lines[-3].split()[:2] == ["LoRA", "0.00"]
    assert lines[-2].startswith("full fine-tuning")
    assert lines[-1].startswith("(base weights fp32, adapter weights fp32")


def test_plan_line_matches_peft_with_tied_embeddings_and_conv1d(capsys, ckpt, write):
    spec = write("all.json", json.dumps(ALL_LINEAR))
    _, out, _ = run(capsys, "plan", spec, ckpt["gpt2"])
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["gpt2"]())
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    )
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() in out.splitlines()
    assert "transformers.Conv1D" in out


def test_json_is_one_document_with_plan_and_memory_in_bytes(capsys, ckpt, spec):
    code, out, _ = run(capsys, "plan", spec, ckpt["opt"], "--json", "--dtype", "bf16")
    assert code == 0
    doc = json.loads(out)
    plan = doc["plan"]
    assert (doc["model_class"], doc["model_type"]) == ("OPTForCausalLM", "opt")
    assert len(plan["targets"]) == 4 and plan["targets"][0]["params"] == 256
    assert doc["trainable_line"] == (
        "trainable params: 1,024 || all params: 7,072 || trainable%: 14.4796"
    )
    n, a = plan["base_params"], plan["adapter_params"]
    assert doc["memory"]["dtype"] == "bf16"
    assert doc["memory"]["lora"] == {
        "weights": 2 * n + 4 * a,
        "gradients": 4 * a,
        "optimizer": 8 * a,
        "total": 2 * n + 16 * a,
    }
    assert doc["memory"]["full"]["total"] == 12 * n


@pytest.mark.parametrize("which", ["sharded", "config.json", "cached id"])
def test_plan_takes_sharded_dirs_config_files_and_cached_ids(capsys, ckpt, spec, which):
    extra: list[object] = []
    if which == "sharded":
        model: object = ckpt["sharded"]
    elif which == "config.json":
        model = ckpt["opt"] / "config.json"
    else:
        model, extra = "org/tiny-opt", ["--cache-dir", ckpt["cache"]]
    code, out, _ = run(capsys, "plan", spec, model, "--json", *extra)
    assert code == 0 and json.loads(out)["plan"]["trainable_params"] == 1024


def test_model_defaults_to_the_specs_base_model(capsys, ckpt, write):
    spec = write(
        "spec.yaml", QV.replace("version: 1\n", "version: 1\nbase_model: {name: org/tiny-opt}\n")
    )
    code, out, _ = run(capsys, "plan", spec, "--cache-dir", ckpt["cache"])
    assert code == 0 and out.startswith("org/tiny-opt: OPTForCausalLM (meta device")
    bare = write("bare.yaml", QV)
    code, out, err = run(capsys, "plan", bare)
    assert (code, out, err) == (
        1,
        "",
        f"adaptc plan: error: give MODEL: {bare} has no base_model.name\n",
    )


def test_plan_reads_no_weight(capsys, ckpt, spec, tmp_path):
    (tmp_path / "config.json").write_bytes((ckpt["opt"] / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    code, out, _ = run(capsys, "plan", spec, tmp_path, "--json")
    assert code == 0 and json.loads(out)["plan"]["total_params"] == 7072


def test_plan_on_a_custom_factory(capsys, write):
    spec = write("dummy.yaml", QV.replace("task_type: CAUSAL_LM\n", ""))
    code, out, _ = run(capsys, "plan", spec, "tests.test_models:tiny_llama", "--json")
    assert code == 0
    paths = [t["path"] for t in json.loads(out)["plan"]["targets"]]
    assert paths == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no/such/dir", "adaptc plan: error: no such file or directory: no/such/dir"),
        ("org/absent", "adaptc plan: error: the model org/absent is not in the Hugging Face cache"),
        ("tests.nowhere:build", "adaptc plan: error: cannot import module 'tests.nowhere'"),
    ],
)
def test_model_errors_are_one_line(capsys, spec, model, message):
    code, out, err = run(capsys, "plan", spec, model)
    assert (code, out) == (1, "")
    assert err.startswith(message) and err.count("\n") == 1


def test_spec_matching_nothing_is_one_line(capsys, ckpt, write):
    code, out, err = run(capsys, "plan", write("none.yaml", NO_MATCH), ckpt["opt"])
    assert (code, out) == (1, "")
    assert err.startswith("adaptc plan: error: targets.names [query_proj] matched no module")
    assert err.count("\n") == 1


def test_invalid_spec_prints_its_located_errors(capsys, ckpt, write):
    bad = write("bad.yaml", QV.replace("lora_alpha", "lora_alph"))
    code, out, err = run(capsys, "plan", bad, ckpt["opt"])
    assert (code, out) == (1, "")
    assert err.startswith(f"{bad}:6:5: adapters.default.lora_alph: unknown field")


def test_70b_plans_in_seconds_in_little_memory(tmp_path):
    """A 70B-shaped config.json, end to end through a fresh interpreter (imports included).

    The target is ≤ 5 s and < 1 GB (benchmarks/plan_70b.py prints the real figures); the
    test asserts generously so a slow CI machine does not fail it.
    """
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    (tmp_path / "spec.json").write_text(json.dumps(ALL_LINEAR))
    child = (
        "import resource, sys, time; t = time.perf_counter(); from adaptc.cli import main; "
        "code = main(sys.argv[1:]); "
        "print(code, time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
    )
    argv = ["plan", tmp_path / "spec.json", tmp_path / "config.json", "--json"]
    proc = subprocess.run(
        [sys.executable, "-c", child, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    code, seconds, rss_kib = proc.stderr.split()[-3:]
    assert code == "0", proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["plan"]["targets"]) == 80 * 7
    assert doc["plan"]["base_params"] == 68_976_648_192  # Llama-2-70B
    assert doc["memory"]["dtype"] == "bf16"
    assert doc["memory"]["full"]["weights"] == 2 * 68_976_648_192
    assert float(seconds) < 20
    assert int(rss_kib) * 1024 < 2**30


# --- adaptc validate --model ---------------------------------------------------------------


def test_validate_with_model_plans_each_valid_spec(capsys, ckpt, write):
    good, none = write("good.yaml", QV), write("none.yaml", NO_MATCH)
    code, out, _ = run(capsys, "validate", good, none, "--model", ckpt["opt"])
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"{none}:5:5: adapters.default: targets.names [query_proj] matched")
    assert lines[-1] == "2 files checked: 1 valid, 1 invalid (1 error)"


def test_validate_with_model_reports_per_adapter_and_warnings_in_json(capsys, ckpt, write):
    spec = write(
        "two.yaml",
        QV
        + "  other:\n    targets: {kind: names, names: [nothing_here]}\n"
        + "  third:\n    targets: {kind: names, names: [fc2, fc1x]}\n",
    )
    code, out, _ = run(capsys, "validate", spec, "--model", ckpt["opt"], "--format", "json")
    assert code == 1
    (entry,) = json.loads(out)["files"]
    assert [e["field"] for e in entry["errors"]] == ["adapters.other"]
    assert entry["warnings"] == [
        "adapters.third: targets.names entry 'fc1x' matched no module; did you mean 'fc1'?"
    ]


def test_validate_without_model_keeps_its_output(capsys, write):
    code, out, _ = run(capsys, "validate", write("none.yaml", NO_MATCH))
    assert (code, out) == (0, "1 file checked: 1 valid\n")


def test_validate_with_a_missing_model_is_a_usage_error(capsys, write):
    code, _, err = run(capsys, "validate", write("good.yaml", QV), "--model", "no/such/dir")
    assert (code, err) == (2, "adaptc validate: error: no such file or directory: no/such/dir\n")


def test_validate_with_a_task_the_model_lacks(capsys, ckpt, write):
    spec = write("s2s.yaml", QV.replace("CAUSAL_LM", "SEQ_2_SEQ_LM"))
    code, out, _ = run(capsys, "validate", spec, "--model", ckpt["opt"])
    assert code == 1
    assert out.startswith(f"{spec}:2:12: task_type: {ckpt['opt']}: AutoModelForSeq2SeqLM cannot")


def test_meta_builds_leave_the_default_device_alone():
    assert torch.get_default_device().type == "cpu"
