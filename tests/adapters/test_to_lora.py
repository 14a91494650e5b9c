"""Any adapter served as LoRA (``adaptc.to_lora``, ``adaptc convert-adapter``): each layer's
ΔW factored by truncated SVD, checked against the update itself, against peft 0.21.2's
``convert_to_lora`` and through peft loading the converted files."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.conversion import convert_to_lora
from torch import nn

import adaptc
from adaptc.adapters import adapter_state_dict
from adaptc.adapters.keys import target_layers
from adaptc.adapters.to_lora import ToLoraError
from adaptc.cli import main
from adaptc.layers import kind_of
from adaptc.methods.registry import method
from adaptc.peft import set_peft_model_state_dict
from tests.compiler.models import ConvNet, hf_inputs, tiny_hf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def spec(**adapter: Any) -> dict[str, Any]:
    return {"version": 1, "adapters": {"default": {"init": "random", **adapter}}}


def names(*entries: str) -> dict[str, Any]:
    return {"kind": "names", "names": list(entries)}


IA3 = {"method": "ia3", "targets": names("q_proj", "down_proj"), "feedforward": names("down_proj")}


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    return tiny_hf("llama").eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**hf_inputs("llama")).logits


def test_full_rank_reproduces_a_multiplicative_adapter(llama):
    before = copy.deepcopy(llama.state_dict())
    ia3 = adaptc.compile(llama, spec(**IA3)).eval()
    conv = adaptc.to_lora(ia3, llama, rank=10_000)
    assert all(layer.rank == layer.full_rank for layer in conv.layers)
    assert conv.max_error < 1e-6
    torch.testing.assert_close(logits(conv.model), logits(ia3), rtol=1e-5, atol=1e-5)
    assert conv.spec.adapters["default"].method == "lora"
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in before.items())  # untouched


def test_max_error_picks_the_rank_per_layer_and_reports_the_true_error(llama):
    ia3 = adaptc.compile(llama, spec(**IA3)).eval()
    conv = adaptc.to_lora(ia3, llama, max_error=0.3)
    layers = dict(target_layers(conv.model))
    originals = dict(target_layers(ia3))
    for row in conv.layers:
        assert 0 < row.rank < row.full_rank and row.error <= 0.3
        branch = layers[row.path].lora_default
        approx = branch.lora_B.weight @ branch.lora_A.weight
        layer = originals[row.path]
        w = layer.weight.detach()
        merged, _ = method("ia3").merge(kind_of(layer), layer, layer.ia3_default, w, None)
        delta = merged - w
        measured = float(torch.linalg.norm(delta - approx) / torch.linalg.norm(delta))
        assert measured == pytest.approx(row.error, rel=1e-3)
    ranks = {row.path: row.rank for row in conv.layers}
    assert len(set(ranks.values())) > 1  # chosen per layer: rank_pattern holds the others
    cfg = conv.spec.to_peft_config("default")
    for path, r in ranks.items():
        assert cfg["rank_pattern"].get(path, cfg["r"]) == r
        assert cfg["alpha_pattern"].get(path, cfg["lora_alpha"]) == r
    capped = adaptc.to_lora(ia3, llama, max_error=0.3, rank=2)
    assert all(row.rank <= 2 for row in capped.layers)


def test_lora_to_lora_matches_peft_convert_to_lora(llama):
    lora = adaptc.compile(llama, spec(targets=names("q_proj", "v_proj"), r=4, lora_alpha=8))
    theirs = peft.get_peft_model(
        copy.deepcopy(llama),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    peft.set_peft_model_state_dict(theirs, adapter_state_dict(lora, "default"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, state = convert_to_lora(theirs, rank=3)
    conv = adaptc.to_lora(lora, llama, rank=3)
    mine = adapter_state_dict(conv.model, "default")
    assert {k.replace(".lora_A.weight", "").replace(".lora_B.weight", "") for k in state} == {
        k.replace(".lora_A.weight", "").replace(".lora_B.weight", "") for k in mine
    }
    for key in [k for k in state if k.endswith("lora_A.weight")]:
        b = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(mine[b] @ mine[key], state[b] @ state[key], rtol=1e-4, atol=1e-6)
    assert (config.r, config.lora_alpha) == (3, 3)


def test_saved_lora_loads_in_peft(llama, tmp_path):
    ia3 = adaptc.compile(llama, spec(**IA3)).eval()
    conv = adaptc.to_lora(ia3, llama, max_error=0.2)
    adaptc.save_adapter(conv.model, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(theirs), logits(conv.model), rtol=1e-5, atol=1e-5)


def test_conv_and_bias_changes_convert_exactly():
    torch.manual_seed(0)
    net = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    ia3 = adaptc.compile(
        net, spec(method="ia3", targets=names("conv", "head"), feedforward={"kind": "none"})
    )  # fmt: skip  (output scaling: the biases change too)
    conv = adaptc.to_lora(ia3, net, rank=64)
    assert all(row.bias for row in conv.layers)
    assert conv.spec.adapters["default"].lora_bias
    with torch.no_grad():
        torch.testing.assert_close(conv.model(x), ia3(x), rtol=1e-5, atol=1e-5)
    branch = conv.model.conv.lora_default if hasattr(conv.model.conv, "lora_default") else None
    if branch is not None:
        assert branch.lora_A.weight.shape[1:] == (3, 3, 3)


def test_embedding_lora_converts(llama):
    lora = adaptc.compile(llama, spec(targets=names("embed_tokens"), r=4)).eval()
    conv = adaptc.to_lora(lora, llama, rank=4)
    torch.testing.assert_close(logits(conv.model), logits(lora), rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem(llama):
    ia3 = adaptc.compile(llama, spec(**IA3))
    with pytest.raises(ToLoraError, match="give rank, max_error or both"):
        adaptc.to_lora(ia3, llama)
    with pytest.raises(ToLoraError, match="rank must be a positive integer"):
        adaptc.to_lora(ia3, llama, rank=0)
    with pytest.raises(ToLoraError, match="base is a compiled model"):
        adaptc.to_lora(ia3, ia3, rank=2)
    with pytest.raises(ToLoraError, match="no adapter 'other'"):
        adaptc.to_lora(ia3, llama, rank=2, adapter="other")
    lora = adaptc.compile(llama, {"version": 1, "adapters": {"default": {
        "targets": names("q_proj"), "bias": "all"}}})  # fmt: skip
    with pytest.raises(ToLoraError, match="trains base biases"):
        adaptc.to_lora(lora, llama, rank=2)
    zero = adaptc.compile(llama, spec(targets=names("q_proj"), init="default"))
    with pytest.raises(ToLoraError, match="changes no layer"):
        adaptc.to_lora(zero, llama, rank=2)


def _saved_ia3(tmp_path: Path, llama: nn.Module) -> nn.Module:
    llama.save_pretrained(tmp_path / "base")
    ia3 = adaptc.compile(llama, spec(**IA3)).eval()
    adaptc.save_adapter(ia3, tmp_path / "ia3")
    return ia3


def test_cli_converts_a_saved_adapter(llama, tmp_path, capsys):
    ia3 = _saved_ia3(tmp_path, llama)
    args = ["convert-adapter", str(tmp_path / "ia3"), "--to", "lora", "--max-error", "0.25",
            "--model", str(tmp_path / "base"), "--out", str(tmp_path / "lora")]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "rel. error" in out and "model.layers.0.mlp.down_proj" in out
    assert "wrote" in err and "the largest relative error" in err
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "lora").eval()
    rel = (logits(theirs) - logits(ia3)).norm() / (logits(ia3) - logits(llama)).norm()
    assert rel < 0.5  # an approximation within the error asked, not the identity
    assert main(args) == 1  # the output exists
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*args[:6], "--out", str(tmp_path / "x")]) == 1
    assert "names no base model" in capsys.readouterr().err
    assert main(["convert-adapter", str(tmp_path / "ia3"), "--to", "lora", "--out", "y"]) == 1
    assert "give --rank R, --max-error E or both" in capsys.readouterr().err


def test_conv1d_layout_matches_peft_convert_to_lora():
    gpt2 = tiny_hf("gpt2").eval()
    lora = adaptc.compile(gpt2, spec(targets=names("c_attn"), r=4, fan_in_fan_out=True)).eval()
    theirs = peft.get_peft_model(
        copy.deepcopy(gpt2), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    peft.set_peft_model_state_dict(theirs, adapter_state_dict(lora, "default"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = convert_to_lora(theirs, rank=2)
    conv = adaptc.to_lora(lora, gpt2, rank=2)
    mine = adapter_state_dict(conv.model, "default")
    for key in [k for k in state if k.endswith("lora_A.weight")]:
        assert mine[key].shape == state[key].shape
        b = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(mine[b] @ mine[key], state[b] @ state[key], rtol=1e-4, atol=1e-6)
    full = adaptc.to_lora(lora, gpt2, rank=4)
    with torch.no_grad():
        torch.testing.assert_close(
            full.model(**hf_inputs("gpt2")).logits, lora(**hf_inputs("gpt2")).logits,
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip


def test_loha_at_full_rank_reproduces_its_outputs(llama):
    loha = adaptc.compile(llama, spec(method="loha", r=4, targets=names("q_proj", "down_proj")))
    conv = adaptc.to_lora(loha.eval(), llama, rank=16)  # ΔW of a rank-4 Hadamard pair: ≤ 16
    assert all(row.rank == row.full_rank <= 16 for row in conv.layers)
    torch.testing.assert_close(logits(conv.model), logits(loha), rtol=1e-5, atol=1e-5)


def test_lokr_matches_peft_convert_to_lora(llama):
    config = peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(llama), config)
    ours = adaptc.load_spec(
        {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    )
    lokr = adaptc.compile(llama, ours).eval()
    peft_state = peft.get_peft_model_state_dict(theirs)
    set_peft_model_state_dict(lokr, peft_state)
    torch.testing.assert_close(logits(lokr), logits(theirs.eval()), rtol=1e-5, atol=1e-5)
    _, state = convert_to_lora(theirs, rank=3)
    conv = adaptc.to_lora(lokr, llama, rank=3)
    mine = adapter_state_dict(conv.model, "default")
    for key in [k for k in state if k.endswith("lora_A.weight")]:
        b = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(mine[b] @ mine[key], state[b] @ state[key], rtol=1e-4, atol=1e-6)
