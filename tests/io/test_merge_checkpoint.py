"""Merging an adapter into a checkpoint on disk, streamed, sharded like the input."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers as tf

import adaptc
from adaptc.io.merge_checkpoint import merge_checkpoint
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor, peft_config, share_adapter_weights

AUTO = {
    "opt": tf.AutoModelForCausalLM,
    "gpt2": tf.AutoModelForCausalLM,
    "llama": tf.AutoModelForCausalLM,
    "bert": tf.AutoModelForSequenceClassification,
}


def meta_builder(family, path):
    def build(spec):
        config = tf.AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AUTO[family].from_config(config)

    return build


def _setup(tmp_path, family, adapter_fields, shard="20KB"):
    model = tiny_hf(family).eval()
    model.save_pretrained(tmp_path / "base", max_shard_size=shard)
    spec = adaptc.load_spec({"version": 1, "adapters": {"default": adapter_fields}})
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    ours = adaptc.compile(model, spec).eval()
    share_adapter_weights(theirs, ours)
    adaptc.save_adapter(ours, tmp_path / "adapter")
    return model, ours


CASES = [
    ("opt", {"targets": {"kind": "names", "names": ["q_proj", "v_proj", "fc1"]}, "r": 4}),
    ("gpt2", {"targets": {"kind": "all-linear"}, "r": 2, "lora_bias": True}),
    ("llama", {"targets": {"kind": "all-linear"}, "r": 4, "use_dora": True}),
    (
        "llama",
        {"targets": {"kind": "names", "names": ["q_proj", "down_proj"]}, "init": "pissa", "r": 2},
    ),
]


@pytest.mark.parametrize(
    ("family", "fields"), CASES, ids=lambda c: c if isinstance(c, str) else None
)
def test_merged_checkpoint_loads_and_matches_the_adapter_model(tmp_path, family, fields):
    _, ours = _setup(tmp_path, family, fields)
    report = merge_checkpoint(
        tmp_path / "base",
        tmp_path / "adapter",
        tmp_path / "out",
        build_meta_model=meta_builder(family, tmp_path / "base"),
    )
    assert report.merged > 0
    merged = AUTO[family].from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        expected = output_tensor(ours(**hf_inputs(family)))
        got = output_tensor(merged(**hf_inputs(family)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sharding_and_other_files_are_kept(tmp_path):
    _setup(tmp_path, "opt", CASES[0][1])
    merge_checkpoint(
        tmp_path / "base",
        tmp_path / "adapter",
        tmp_path / "out",
        build_meta_model=meta_builder("opt", tmp_path / "base"),
    )
    base = sorted(p.name for p in (tmp_path / "base").iterdir())
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert base == out
    assert len([n for n in out if n.endswith(".safetensors")]) > 1
    index_in = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    index_out = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index_in["weight_map"] == index_out["weight_map"]


def test_refuses_to_overwrite_without_force(tmp_path):
    _setup(tmp_path, "opt", CASES[0][1])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="pass --force"):
        merge_checkpoint(
            tmp_path / "base",
            tmp_path / "adapter",
            tmp_path / "out",
            build_meta_model=meta_builder("opt", tmp_path / "base"),
        )
    assert (tmp_path / "out" / "keep.txt").exists()
    merge_checkpoint(
        tmp_path / "base",
        tmp_path / "adapter",
        tmp_path / "out",
        build_meta_model=meta_builder("opt", tmp_path / "base"),
        force=True,
    )
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_interrupted_merge_leaves_nothing(tmp_path, monkeypatch):
    _setup(tmp_path, "opt", CASES[0][1])
    import adaptc.io.merge_checkpoint as mod

    calls = []
    real = mod._merge_shard

    def failing(src, dst, merger, progress):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst, merger, progress)

    monkeypatch.setattr(mod, "_merge_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(
            tmp_path / "base",
            tmp_path / "adapter",
            tmp_path / "out",
            build_meta_model=meta_builder("opt", tmp_path / "base"),
        )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
