"""VeRA through adaptc's public API, against the real ``peft`` 0.21.2, on a tiny Llama.

The shared projections (drawn as peft draws them, one pair per adapter, the same tensors
in every branch), outputs, gradients, trainable counts, merge, files both ways with and
without ``save_projection``, GPT-2's ``Conv1D``, refused convolutions, a LoRA + VeRA spec,
the config conversion and the ``adaptc.peft`` facade's ``VeraConfig``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import adaptc
from adaptc.methods.vera.method import VeraBranch
from adaptc.spec import from_peft_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}
TARGETS = ["q_proj", "v_proj", "down_proj"]  # out 32/16/32, in 32/32/64: A (r, 64), B (32, r)
PREFIX = "base_model.model."


def spec(**fields: Any) -> dict[str, Any]:
    adapter = {"method": "vera", "r": 4, "targets": {"kind": "names", "names": TARGETS}}
    return {"version": 1, "adapters": {"default": {**adapter, **fields}}}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 9, 27, 3, 99, 64, 2], [7, 7, 1, 0, 12, 4, 90, 31]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # type: ignore[no-any-return]


def peft_model(base: nn.Module, _copy: Any = None, **kwargs: Any) -> Any:
    """peft's VeRA on a copy of ``base`` (with the vectors of the peft model ``_copy``)."""
    config = peft.VeraConfig(r=4, target_modules=TARGETS, **kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    if _copy is not None:
        with torch.no_grad():
            source = peft_vectors(_copy)
            for key, p in peft_vectors(model).items():
                p.copy_(source[key])
    return model


def ours_branches(model: nn.Module) -> dict[str, VeraBranch]:
    return {m.target: m for m in model.modules() if isinstance(m, VeraBranch)}


def peft_vectors(model: Any) -> dict[str, nn.Parameter]:
    out = {}
    for name, p in model.named_parameters():
        for key in ("vera_lambda_b", "vera_lambda_d"):
            if name.endswith(f".{key}.default"):
                out[(name.removeprefix(PREFIX).removesuffix(f".{key}.default"), key)] = p
    return out


def randomize_and_share(theirs: Any, ours: nn.Module, seed: int = 0) -> None:
    """'Train' PEFT's vectors (random values), then give adaptc's branches the same."""
    gen = torch.Generator().manual_seed(seed)
    branches = ours_branches(ours)
    vectors = peft_vectors(theirs)
    assert len(vectors) == 12 and {p for p, _ in vectors} == set(branches)
    with torch.no_grad():
        for (path, key), p in vectors.items():
            p.copy_(torch.randn(p.shape, generator=gen))
            getattr(branches[path], key).copy_(p)


def file_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def test_same_seed_same_tensors_as_peft_and_one_shared_pair() -> None:
    base = tiny_llama()
    for init in ("default", "random"):
        torch.manual_seed(3)
        ours = adaptc.compile(base, adaptc.load_spec(spec(init=init, projection_prng_key=7)))
        torch.manual_seed(3)
        theirs = peft_model(base, init_weights=init == "default", projection_prng_key=7)
        branches = ours_branches(ours)
        for (path, key), p in peft_vectors(theirs).items():
            assert torch.equal(getattr(branches[path], key), p), (init, path, key)
        first = next(iter(branches.values()))
        assert all(b.vera_A is first.vera_A and b.vera_B is first.vera_B for b in branches.values())
        assert torch.equal(first.vera_A, theirs.base_model.vera_A["default"])  # (4, 64)
        assert torch.equal(first.vera_B, theirs.base_model.vera_B["default"])  # (32, 4)
        assert not first.vera_A.requires_grad


def test_outputs_grads_counts_and_merge_match_peft() -> None:
    base = tiny_llama()
    ours = adaptc.compile(base, adaptc.load_spec(spec()))
    theirs = peft_model(base)
    randomize_and_share(theirs, ours)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert adaptc.trainable_parameters(ours)[0] == 2 * (32 + 16 + 32 + 3 * 4)
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)

    ours(input_ids=IDS).logits.pow(2).mean().backward()
    theirs(input_ids=IDS).logits.pow(2).mean().backward()
    branches = ours_branches(ours)
    for (path, key), p in peft_vectors(theirs).items():
        grad = getattr(branches[path], key).grad
        assert grad is not None and p.grad is not None
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-7)
    assert next(iter(branches.values())).vera_A.grad is None

    expected = logits(ours)
    merged = adaptc.merge(ours)
    assert not any(isinstance(m, VeraBranch) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, **EXACT)
    torch.testing.assert_close(
        logits(merged), logits(copy.deepcopy(theirs).merge_and_unload()), **EXACT
    )
    adaptc.merge_in_place(ours)
    torch.testing.assert_close(logits(ours), expected, **EXACT)
    adaptc.unmerge_in_place(ours)
    assert torch.equal(logits(ours), expected)
    assert torch.equal(logits(base), logits(copy.deepcopy(theirs).unload()))  # base untouched


def test_bfloat16_base_and_dropout_match_peft_exactly() -> None:
    """PEFT rounds the projections and vectors through the base dtype, then upcasts them to
    float32 (``autocast_adapter_dtype``); adaptc does the same, so bf16 outputs are equal."""
    base = tiny_llama().to(torch.bfloat16)
    ours = adaptc.compile(base, adaptc.load_spec(spec(vera_dropout=0.1)))
    theirs = peft_model(base, vera_dropout=0.1)
    randomize_and_share(theirs, ours)
    branch = next(iter(ours_branches(ours).values()))
    assert branch.vera_A.dtype == branch.vera_lambda_b.dtype == torch.float32
    assert torch.equal(branch.vera_A, theirs.base_model.vera_A["default"])
    ours.eval()
    assert torch.equal(logits(ours), logits(theirs))
    assert torch.equal(logits(adaptc.merge(ours)), logits(copy.deepcopy(theirs).merge_and_unload()))


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_both_ways(save_projection: bool, tmp_path: Path) -> None:
    base = tiny_llama()
    ours = adaptc.compile(base, adaptc.load_spec(spec(save_projection=save_projection)))
    theirs = peft_model(base, save_projection=save_projection)
    randomize_and_share(theirs, ours)
    if save_projection:  # then the file, not the key, decides: change peft's projections
        with torch.no_grad():
            theirs.base_model.vera_A["default"].mul_(1.5)
            theirs.base_model.vera_B["default"].add_(0.25)
            next(iter(ours_branches(ours).values())).vera_A.mul_(1.5)  # one shared pair
            next(iter(ours_branches(ours).values())).vera_B.add_(0.25)
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)

    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    keys = file_keys(tmp_path / "ours")
    assert keys == file_keys(tmp_path / "theirs")
    assert ("base_model.vera_A" in keys) is ("base_model.vera_B" in keys) is save_projection
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    reference["target_modules"] = sorted(reference["target_modules"])
    assert {k: written[k] for k in reference} == reference

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(loaded.eval()), logits(theirs), **EXACT)
    back = adaptc.load_adapter(base, tmp_path / "theirs")
    torch.testing.assert_close(logits(back), logits(theirs), **EXACT)
    branches = list(ours_branches(back).values())
    assert all(b.vera_A is branches[0].vera_A for b in branches)

    into = adaptc.compile(base, adaptc.load_spec(spec()))  # load_adapter_into: add_adapter
    adaptc.load_adapter_into(into, tmp_path / "theirs", adapter_name="other")
    added = [b for b in ours_branches_all(into) if b.adapter == "other"]
    assert len(added) == 6 and all(b.vera_A is added[0].vera_A for b in added)
    assert torch.equal(added[0].vera_A, theirs.base_model.vera_A["default"])


def ours_branches_all(model: nn.Module) -> list[VeraBranch]:
    return [m for m in model.modules() if isinstance(m, VeraBranch)]


def test_gpt2_conv1d_matches_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16)
    base = transformers.GPT2LMHeadModel(config).eval()
    targets = ["c_attn", "mlp.c_proj"]  # Conv1D: out 96/32, in 32/128
    adapter = {"method": "vera", "r": 4, "targets": {"kind": "names", "names": targets}}
    ours = adaptc.compile(base, adaptc.load_spec({"version": 1, "adapters": {"default": adapter}}))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=targets)
    ).eval()
    gen = torch.Generator().manual_seed(1)
    branches = ours_branches(ours)
    with torch.no_grad():
        for (path, key), p in peft_vectors(theirs).items():
            p.copy_(torch.randn(p.shape, generator=gen))
            getattr(branches[path], key).copy_(p)
    assert next(iter(branches.values())).vera_A.shape == (4, 128)
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)
    merged = logits(adaptc.merge(ours))
    torch.testing.assert_close(merged, logits(copy.deepcopy(theirs).merge_and_unload()), **EXACT)
    adaptc.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is True  # PEFT forces it for Conv1D
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(loaded.eval()), logits(theirs), **EXACT)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv1(x)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def test_conv_targets_are_refused_naming_the_layer() -> None:
    adapter = {"method": "vera", "r": 2, "targets": {"kind": "names", "names": ["conv1", "head"]}}
    with pytest.raises(
        ValueError,
        match=r"'conv1' \(Conv2d\).*VeRA does not support its type; supported: nn.Linear",
    ):
        adaptc.compile(CNN(), adaptc.load_spec({"version": 1, "adapters": {"default": adapter}}))


def test_lora_and_vera_in_one_spec() -> None:
    """Both active: VeRA's update does not depend on the base weight, so it equals peft's
    VeRA on the base with peft's LoRA merged in (peft's mixed model refuses VeRA)."""
    base = tiny_llama()
    lora = {
        "method": "lora", "r": 2, "lora_alpha": 4, "init": "random",
        "targets": {"kind": "names", "names": ["q_proj", "k_proj"]},
    }  # fmt: skip
    vera = spec()["adapters"]["default"]
    both = adaptc.compile(
        base, adaptc.load_spec({"version": 1, "adapters": {"l": lora, "v": vera}})
    )
    peft_lora = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False
        ),
    )
    lora_tensors = {
        m.target: m for m in both.modules() if type(m).__name__ == "LoraBranch"
    }  # adaptc's LoRA branches
    with torch.no_grad():
        for name, p in peft_lora.named_parameters():
            if ".lora_A.default" in name or ".lora_B.default" in name:
                path = name.removeprefix(PREFIX).split(".lora_")[0]
                which = "lora_A" if ".lora_A." in name else "lora_B"
                getattr(lora_tensors[path], which).weight.copy_(p)
    lora_only = logits(both)  # the first adapter is the active one
    torch.testing.assert_close(lora_only, logits(peft_lora.eval()), **EXACT)
    adaptc.set_active(both, ["l", "v"])
    theirs = peft_model(peft_lora.merge_and_unload())
    randomize_and_share(theirs, both)
    torch.testing.assert_close(logits(both), logits(theirs), **EXACT)
    assert not torch.allclose(logits(both), lora_only)
    adaptc.set_active(both, "v")  # VeRA alone: peft's VeRA on the plain base
    torch.testing.assert_close(logits(both), logits(peft_model(base, _copy=theirs)), **EXACT)


def test_peft_config_converts_both_ways() -> None:
    config = peft.VeraConfig(
        r=8, target_modules=["q_proj"], projection_prng_key=5, save_projection=False,
        vera_dropout=0.1, d_initial=0.2, bias="vera_only", init_weights=False,
        layers_to_transform=[1], layers_pattern="layers",
    ).to_dict()  # fmt: skip
    config["peft_type"] = "VERA"
    loaded = from_peft_config(config)
    a = loaded.adapters["default"]
    assert (a.r, a.projection_prng_key, a.save_projection, a.init) == (8, 5, False, "random")
    written = loaded.to_peft_config("default")
    assert {k: written[k] for k in config if k not in ("target_modules",)} == {
        k: v for k, v in config.items() if k != "target_modules"
    }
    with pytest.raises(Exception, match=r"use_dora.*not supported by adaptc for VeRA"):
        from_peft_config({**config, "use_dora": True})
    with pytest.raises(Exception, match="exclude"):
        adaptc.load_spec(spec(exclude={"kind": "names", "names": ["v_proj"]}))


def test_facade_config_and_get_peft_model_match_peft() -> None:
    from adaptc.peft import VeraConfig, get_peft_model  # type: ignore[attr-defined]

    ours_fields = [(f.name, f.default) for f in dataclasses.fields(VeraConfig)]
    theirs_fields = [(f.name, f.default) for f in dataclasses.fields(peft.VeraConfig)]
    assert ours_fields == theirs_fields
    kwargs = {"r": 4, "target_modules": TARGETS, "task_type": "CAUSAL_LM"}
    assert VeraConfig(**kwargs).to_dict() == peft.VeraConfig(**kwargs).to_dict()
    base = tiny_llama()
    ours = get_peft_model(base, VeraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**kwargs))
    lines = []
    for model in (ours, theirs):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        lines.append(buffer.getvalue())
    assert lines[0] == lines[1]
    randomize_and_share(theirs.eval(), ours)
    torch.testing.assert_close(logits(ours.eval()), logits(theirs), **EXACT)
