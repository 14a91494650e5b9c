"""Merging an adapter into a checkpoint on disk, streamed, sharded like the input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from torch import nn

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


def test_a_sharded_checkpoint_in_another_dtype(tmp_path):
    """``dtype=``: every float tensor rewritten (new headers and offsets), the index's total
    size and the config's dtype with them; the merge adds the update before rounding."""
    _setup(tmp_path, "opt", CASES[0][1])
    build = meta_builder("opt", tmp_path / "base")
    args = (tmp_path / "base", tmp_path / "adapter")
    merge_checkpoint(*args, tmp_path / "bf16", build_meta_model=build, dtype=torch.bfloat16)
    merge_checkpoint(*args, tmp_path / "fp32", build_meta_model=build)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    tensors = {k: v for s in shards for k, v in load_file(tmp_path / "bf16" / s).items()}
    exact = {k: v for s in shards for k, v in load_file(tmp_path / "fp32" / s).items()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for key, value in exact.items():  # rounded once from the float32 merge
        torch.testing.assert_close(tensors[key], value.to(torch.bfloat16), rtol=0, atol=0)
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged.dtype == torch.bfloat16


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

    def failing(src, dst, merger, *args):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst, merger, *args)

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


class Attention(nn.Module):
    """An ``nn.MultiheadAttention`` (a target with two weights) and a linear head."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def _save_two_shards(model: nn.Module, directory: Path) -> None:
    """The state dict in two shards, ``in_proj_weight`` and ``out_proj.weight`` apart."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    directory.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {k: names[k.startswith(("attn.out_proj.", "head."))] for k in state}
    for name in names:
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, directory / name)
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("writer", ["peft", "adaptc"])
def test_a_multihead_attention_target_merges_as_adaptc_merge_does(tmp_path, writer, dtype):
    """Both of the layer's weights change (PEFT's keys: ``attn.lora_A.weight`` for the
    fused input projection, ``attn.base_layer.out_proj.lora_A.weight`` for ``out_proj``),
    each from its own shard, to exactly what ``adaptc.merge`` gives (PEFT's
    ``merge_and_unload`` in float32, its twice-counted ``out_proj`` update included), also
    for a bfloat16 checkpoint whose meta model is float32."""
    torch.manual_seed(0)
    model = Attention().eval().to(dtype)
    _save_two_shards(model, tmp_path / "base")
    config = peft.LoraConfig(
        target_modules=["attn", "head"], r=2, lora_alpha=4, init_lora_weights=False
    )
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = adaptc.load_adapter(model, tmp_path / "peft")
    adapter_dir = tmp_path / "peft"
    if writer == "adaptc":
        adapter_dir = tmp_path / "adaptc"
        adaptc.save_adapter(ours, adapter_dir)
    assert "base_model.model.attn.base_layer.out_proj.lora_A.weight" in load_file(
        adapter_dir / "adapter_model.safetensors"
    )

    report = merge_checkpoint(
        tmp_path / "base", adapter_dir, tmp_path / "out", build_meta_model=lambda _: _meta()
    )

    assert report.merged == 3  # in_proj_weight, out_proj.weight, head.weight
    got: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(shard))
    expected = adaptc.merge(ours).state_dict()
    peft_merged = theirs.merge_and_unload().state_dict()
    before = model.state_dict()
    assert set(got) == set(before)
    for key, tensor in got.items():
        assert tensor.dtype == dtype and torch.equal(tensor, expected[key]), key
        if dtype == torch.float32:  # peft's in-place bfloat16 merge rounds otherwise
            torch.testing.assert_close(tensor, peft_merged[key], rtol=1e-6, atol=1e-6, msg=key)
        changed = key in ("attn.in_proj_weight", "attn.out_proj.weight", "head.weight")
        assert torch.equal(tensor, before[key]) != changed, key


def _meta() -> nn.Module:
    with torch.device("meta"):
        return Attention()
