"""BOFT against the real ``peft`` 0.21.2: a tiny Llama (Linear) and a small CNN (Conv2d).

Outputs, gradients after a backward, merges, trainable counts, files both ways, the facade,
the user's model left alone, PEFT's block rules, a LoRA + BOFT spec, and the butterfly
factors (peft computes them only with its CUDA extension: a CPU stand-in for it here).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from peft.tuners.boft import layer as peft_boft
from safetensors import safe_open
from torch import nn

import adaptc
from adaptc.methods.boft.method import BOFTBranch, butterfly_perm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 27, 3, 99, 64, 2], [7, 7, 1, 0, 12, 4, 90, 31]])


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


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=True)
        self.point = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 5 * 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.point(torch.relu(self.conv(x))))
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


def spec(targets: list[str], **extra: Any) -> adaptc.Spec:
    adapter = {"method": "boft", "targets": {"kind": "names", "names": targets}, **extra}
    return adaptc.load_spec({"version": 1, "adapters": {"default": adapter}})


def peft_model(base: nn.Module, targets: list[str], **kw: Any) -> Any:
    config = peft.BOFTConfig(target_modules=targets, init_weights=False, **kw)
    torch.manual_seed(1)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def share(theirs: Any, ours: nn.Module) -> None:
    """Copy peft's random factors into ours' branches."""
    named = dict(theirs.named_parameters())
    for branch in ours.modules():
        if isinstance(branch, BOFTBranch):
            key = f"base_model.model.{branch.target}"
            with torch.no_grad():
                branch.boft_R.copy_(named[f"{key}.boft_R.default"])
                branch.boft_s.copy_(named[f"{key}.boft_s.default"])


def grads(model: nn.Module, peft_names: bool) -> dict[str, torch.Tensor]:
    out = {}
    if peft_names:
        for name, p in model.named_parameters():
            if p.grad is not None:
                path, tensor = name.removeprefix("base_model.model.").rsplit(".", 2)[:2]
                out[f"{path}.{tensor}"] = p.grad
    else:
        for m in model.modules():
            if isinstance(m, BOFTBranch):
                assert m.boft_R.grad is not None and m.boft_s.grad is not None
                out[f"{m.target}.boft_R"] = m.boft_R.grad
                out[f"{m.target}.boft_s"] = m.boft_s.grad
    return out


def test_llama_outputs_grads_merge_counts_match_peft() -> None:
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    theirs = peft_model(base, TARGETS, boft_block_size=4, bias="boft_only")
    ours = adaptc.compile(base, spec(TARGETS, boft_block_size=4, bias="boft_only")).eval()
    share(theirs, ours)
    out_t = theirs(input_ids=IDS).logits
    out_o = ours(input_ids=IDS).logits
    torch.testing.assert_close(out_o, out_t, **TOL)
    assert not torch.allclose(out_o, base(input_ids=IDS).logits, atol=1e-3)
    out_t.square().mean().backward()
    out_o.square().mean().backward()
    g_t, g_o = grads(theirs, True), grads(ours, False)
    assert set(g_o) <= set(g_t) and len(g_o) == 4 * len(TARGETS)
    for key, value in g_o.items():
        torch.testing.assert_close(value, g_t[key], **TOL)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        merged = adaptc.merge(ours)(input_ids=IDS).logits
        peft_merged = copy.deepcopy(theirs).merge_and_unload()(input_ids=IDS).logits
        torch.testing.assert_close(merged, out_o.detach(), **TOL)
        torch.testing.assert_close(merged, peft_merged, **TOL)
        torch.testing.assert_close(ours(input_ids=IDS).logits, out_o.detach(), rtol=0, atol=0)
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any("boft" in name for name, _ in base.named_modules())


def test_identity_init_is_a_no_op_and_counts() -> None:
    base = tiny_llama()
    ours = adaptc.compile(base, spec(TARGETS, boft_block_num=8, boft_block_size=0))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.BOFTConfig(target_modules=TARGETS, boft_block_num=8, boft_block_size=0),
    )
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=1e-6
        )
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_files_both_ways(tmp_path: Path) -> None:
    base = tiny_llama()
    theirs = peft_model(base, TARGETS)
    ours = adaptc.compile(base, spec(TARGETS)).eval()
    share(theirs, ours)
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    keys = []
    for name in ("ours", "theirs"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1]  # boft_R and boft_s only: boft_P is not saved
    assert all(k.endswith((".boft_R", ".boft_s")) for k in keys[0])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    back = adaptc.load_adapter(base, tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, **TOL)
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, **TOL)


def test_cnn_conv_and_linear_match_peft() -> None:
    torch.manual_seed(0)
    base = CNN().eval()
    x = torch.randn(2, 4, 5, 5)
    targets = ["conv", "point", "fc"]
    theirs = peft_model(base, targets, boft_block_size=4)
    ours = adaptc.compile(base, spec(targets, boft_block_size=4)).eval()
    share(theirs, ours)
    out_t, out_o = theirs(x), ours(x)
    torch.testing.assert_close(out_o, out_t, **TOL)
    out_t.sum().backward()
    out_o.sum().backward()
    g_t = grads(theirs, True)
    for key, value in grads(ours, False).items():
        torch.testing.assert_close(value, g_t[key], **TOL)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        torch.testing.assert_close(adaptc.merge(ours)(x), out_o.detach(), **TOL)
        torch.testing.assert_close(
            copy.deepcopy(theirs).merge_and_unload()(x), out_o.detach(), **TOL
        )
        weight = ours.conv.weight.detach().clone()
        adaptc.merge_in_place(ours)
        torch.testing.assert_close(ours(x), out_o.detach(), **TOL)
        adaptc.unmerge_in_place(ours)
        assert torch.equal(ours.conv.weight, weight)
        assert torch.equal(ours(x), out_o.detach())


class _FakeFBD:
    """A CPU stand-in for peft's ``fbd_cuda`` extension (block diagonals of a batch)."""

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*blocks.unbind(0)) for blocks in x])]


def test_butterfly_factors_match_peft_with_its_extension(monkeypatch: Any) -> None:
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: _FakeFBD())
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 16))
    h = torch.randn(3, 32)
    kw = {"boft_block_size": 2, "boft_n_butterfly_factor": 3}
    theirs = peft_model(base, ["0"], **kw)
    ours = adaptc.compile(base, spec(["0"], **kw)).eval()
    share(theirs, ours)
    branch = next(m for m in ours.modules() if isinstance(m, BOFTBranch))
    assert tuple(branch.boft_R.shape) == (3, 16, 2, 2)
    layer = theirs.base_model.model[0]
    assert torch.equal(branch.boft_P, layer.boft_P)
    assert torch.equal(butterfly_perm(32, 8, 2, 2), layer.block_butterfly_perm(32, 8, 2, 2))
    with torch.no_grad():
        expected = theirs(h)
        torch.testing.assert_close(ours(h), expected, **TOL)
        torch.testing.assert_close(adaptc.merge(ours)(h), expected, **TOL)
        rot = branch.matrix()
        torch.testing.assert_close(rot @ rot.t(), torch.eye(32), **TOL)


def test_lora_and_boft_in_one_spec_sum_their_effects() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 16))
    theirs = peft_model(base, ["0"])
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    torch.manual_seed(2)
    lora = peft.get_peft_model(copy.deepcopy(base), lora_cfg).eval()
    adapters = {
        "lora": {
            "method": "lora",
            "r": 4,
            "lora_alpha": 8,
            "targets": {"kind": "names", "names": ["0"]},
        },
        "default": {"method": "boft", "targets": {"kind": "names", "names": ["0"]}},
    }
    ours = adaptc.compile(base, adaptc.load_spec({"version": 1, "adapters": adapters})).eval()
    adaptc.set_active(ours, ["default", "lora"])  # BOFT first: merges exactly
    share(theirs, ours)
    named = dict(lora.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            for part in ("A", "B"):
                if f"lora_{part}." in name:
                    p.copy_(named[f"base_model.model.0.lora_{part}.default.weight"])
        h = torch.randn(3, 32)
        want = theirs(h) + lora(h) - base(h)
        torch.testing.assert_close(ours(h), want, **TOL)
        torch.testing.assert_close(adaptc.merge(ours)(h), want, **TOL)


def test_block_rules_and_errors() -> None:
    with pytest.raises(ValueError, match="either boft_block_size or boft_block_num"):
        spec(TARGETS, boft_block_size=0)
    with pytest.raises(ValueError, match="set only one of boft_block_size"):
        spec(TARGETS, boft_block_num=4)
    base = tiny_llama()
    with pytest.raises(
        ValueError, match=r"in_features \(32\) must be divisible by boft_block_size"
    ):
        adaptc.compile(base, spec(TARGETS, boft_block_size=5))
    odd = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"boft_block_size \(3\) must be an even number!"):
        adaptc.compile(
            odd, spec(["0"], boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=2)
        )
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="groups > 1"):
        adaptc.compile(grouped, spec(["0"]))
    cfg = {
        "peft_type": "BOFT",
        "boft_block_size": 4,
        "target_modules": ["q_proj"],
        "use_dora": True,
    }
    with pytest.raises(ValueError, match="'use_dora' is not supported by adaptc for BOFT"):
        adaptc.load_spec(cfg)


def test_facade_get_peft_model_matches_peft() -> None:
    from adaptc.peft import BOFTConfig, get_peft_model  # type: ignore[attr-defined]

    base = tiny_llama()
    kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM", "target_modules": TARGETS}
    ours = get_peft_model(base, BOFTConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with pytest.raises(ValueError, match="boft_block_num"):
        BOFTConfig(boft_block_size=4, boft_block_num=4)
