"""OFT against the real ``peft`` 0.21.2: a tiny Llama and a small CNN.

Outputs, gradients after a backward, merge, trainable counts, files both ways, the
facade's ``OFTConfig``, LoRA + OFT against ``PeftMixedModel``. peft's unmerged forward on
a k×k convolution (k > 1) is wrong (unfold / rotate / fold sums overlapping patches): the
CNN tests measure that discrepancy and compare with peft only where peft is right
(Linear, 1×1 convolutions, the merged 3×3 convolution).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from peft.tuners.oft.layer import OFTLayer
from safetensors import safe_open
from torch import nn

import adaptc
from adaptc.methods.oft.method import OFTBranch
from adaptc.methods.oft.spec import OFTAdapter, adjust, resolve_blocks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLOSE: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
PREFIX = "base_model.model."
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
        self.conv3 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(torch.relu(self.conv3(x))))
        return self.fc(h.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN().eval()


def spec(targets: list[str], **fields: Any) -> adaptc.Spec:
    adapter = {"method": "oft", "targets": {"kind": "names", "names": targets}, **fields}
    return adaptc.load_spec({"version": 1, "adapters": {"default": adapter}})


def share(theirs: Any, ours: nn.Module, adapter: str = "default", seed: int = 1) -> None:
    """'Train' peft's rotations (random values), then give adaptc's branches the same."""
    gen = torch.Generator().manual_seed(seed)
    mine = {m.target: m for m in ours.modules() if isinstance(m, OFTBranch)}
    found = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(f".oft_R.{adapter}.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                branch = mine[path_of(name, adapter)]
                assert branch.oft_R.weight.shape == p.shape
                branch.oft_R.weight.copy_(p)
                found += 1
    assert found == len(mine) > 0


def path_of(name: str, adapter: str) -> str:
    """The target of peft's parameter ``name`` (a mixed model's LoRA layer wraps OFT's)."""
    path = name.removeprefix(PREFIX).removesuffix(f".oft_R.{adapter}.weight")
    return path.removesuffix(".base_layer")


def grads(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    if not isinstance(model, (peft.PeftModel, peft.PeftMixedModel)):
        found = (m for m in model.modules() if isinstance(m, OFTBranch) and m.adapter == adapter)
        return {f"{b.target}.oft_R.weight": b.oft_R.weight.grad for b in found}  # type: ignore[misc]
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if f".oft_R.{adapter}." in name:
            out[name.removeprefix(PREFIX).replace(f".oft_R.{adapter}.", ".oft_R.")] = p.grad
    return out


def peft_llama(base: nn.Module, **kwargs: Any) -> Any:
    config = peft.OFTConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **kwargs)
    return peft.get_peft_model(copy.deepcopy(base), config)


# --- the spec --------------------------------------------------------------------------


def test_spec_defaults_convert_to_peft_s_config_and_back() -> None:
    ours = spec(TARGETS)
    expected = peft.OFTConfig(target_modules=TARGETS).to_dict()
    expected = {
        k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in expected.items()
    }
    assert ours.to_peft_config() == expected
    assert adaptc.load_spec(expected).to_peft_config() == expected


def test_r_and_block_size_rule_is_peft_s() -> None:
    with pytest.raises(adaptc.SpecError, match=r"default\.r: .*either r or oft_block_size"):
        spec(TARGETS, r=0, oft_block_size=0)
    with pytest.raises(adaptc.SpecError, match=r"oft_block_size: set only one of r \(4\)"):
        spec(TARGETS, r=4)
    for features in (8, 12, 27, 30, 64):
        for value in range(1, 70):
            assert adjust(features, value) == OFTLayer.adjust_oft_parameters(None, features, value)
    adapter = OFTAdapter(method="oft", oft_block_size=5)
    assert resolve_blocks(adapter, 32)[:2] == (8, 4)  # peft: 5 -> 4, r = 8
    assert adapter.oft_block_size == 5  # the spec is not rewritten


# --- tiny Llama ------------------------------------------------------------------------

CASES = [
    {"oft_block_size": 8},
    {"r": 4, "oft_block_size": 0, "block_share": True, "use_cayley_neumann": False},
    {"oft_block_size": 5, "coft": True, "eps": 1e-2, "num_cayley_neumann_terms": 3},
]


@pytest.mark.parametrize("fields", CASES, ids=["block8", "r4-share-exact", "adjusted-coft"])
def test_llama_outputs_grads_merge_and_counts_match_peft(fields: dict[str, Any]) -> None:
    base = tiny_llama()
    theirs = peft_llama(base, **fields)
    ours = adaptc.compile(base, spec(TARGETS, **fields))
    share(theirs, ours)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    out_ours, out_theirs = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, **CLOSE)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    g_ours, g_theirs = grads(ours), grads(theirs)
    assert sorted(g_ours) == sorted(g_theirs) and len(g_ours) == 6
    for name, g in g_ours.items():
        torch.testing.assert_close(g, g_theirs[name], **CLOSE)
    with torch.no_grad():
        merged = adaptc.merge(ours)(input_ids=IDS).logits
        torch.testing.assert_close(merged, out_ours.detach(), **CLOSE)
        peft_merged = theirs.merge_and_unload()(input_ids=IDS).logits
        torch.testing.assert_close(merged, peft_merged, **CLOSE)


def test_files_both_ways_and_original_untouched(tmp_path: Path) -> None:
    base = tiny_llama()
    before = {n: p.clone() for n, p in base.named_parameters()}
    ours = adaptc.compile(base, spec(TARGETS, oft_block_size=8))
    theirs = peft_llama(base, oft_block_size=8).eval()
    share(theirs, ours)
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    keys = []
    for d in ("ours", "theirs"):
        with safe_open(str(tmp_path / d / "adapter_model.safetensors"), "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1]
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.oft_R.weight" in keys[0]
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
        torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, expected, **CLOSE)
        back = adaptc.load_adapter(base, tmp_path / "theirs")
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, **CLOSE)
    assert all(
        torch.equal(p, before[n]) and not isinstance(p, OFTBranch)
        for n, p in base.named_parameters()
    )
    assert not any(isinstance(m, OFTBranch) for m in base.modules())


# --- small CNN -------------------------------------------------------------------------

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def peft_cnn(base: nn.Module, targets: list[str], init: bool = True) -> Any:
    config = peft.OFTConfig(target_modules=targets, oft_block_size=3, init_weights=init)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def test_cnn_identity_init_is_the_base_and_peft_s_3x3_conv_is_not() -> None:
    base = cnn()
    targets = ["conv3", "conv1", "fc"]
    ours = adaptc.compile(base, spec(targets, oft_block_size=3))
    theirs = peft_cnn(base, targets)
    with torch.no_grad():
        expected = base(X)
        assert torch.equal(ours(X), expected)  # R = I: exactly the base
        torch.testing.assert_close(adaptc.merge(ours)(X), expected, rtol=0, atol=1e-6)
        # peft's documented bug: unmerged output off the base on the 3×3 convolution ...
        layer = theirs.base_model.model.conv3
        off = (layer(X) - base.conv3(X)).abs().max().item()
        assert off > 0.3, off  # ≈0.55 here (a pixel is counted once per 3×3 patch it is in)
        assert (theirs(X) - expected).abs().max().item() > 1e-2
        # ... while its merge is the base (and 1×1 / Linear alone are consistent)
        torch.testing.assert_close(theirs.merge_and_unload()(X), expected, rtol=0, atol=1e-6)
        alone = peft_cnn(base, ["conv1", "fc"])
        torch.testing.assert_close(alone(X), expected, rtol=0, atol=1e-6)


def test_cnn_random_matches_peft_where_peft_is_right() -> None:
    base = cnn()
    ours = adaptc.compile(base, spec(["conv1", "fc"], oft_block_size=2))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.OFTConfig(target_modules=["conv1", "fc"], oft_block_size=2)
    ).eval()
    share(theirs, ours)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    out_ours, out_theirs = ours(X), theirs(X)
    torch.testing.assert_close(out_ours, out_theirs, **CLOSE)
    out_ours.sum().backward()
    out_theirs.sum().backward()
    g_theirs = grads(theirs)
    for name, g in grads(ours).items():
        torch.testing.assert_close(g, g_theirs[name], **CLOSE)
    with torch.no_grad():
        torch.testing.assert_close(adaptc.merge(ours)(X), out_ours, **CLOSE)
    # with the 3×3 convolution: adaptc's unmerged = its merge = peft's merge
    targets = ["conv3", "conv1", "fc"]
    ours = adaptc.compile(base, spec(targets, oft_block_size=3))
    theirs = peft_cnn(base, targets)
    share(theirs, ours)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        unmerged = ours(X)
        torch.testing.assert_close(adaptc.merge(ours)(X), unmerged, **CLOSE)
        torch.testing.assert_close(theirs.merge_and_unload()(X), unmerged, **CLOSE)


def test_unsupported_conv_is_refused_naming_it() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"0: OFT supports Conv2d layers .* groups=2"):
        adaptc.compile(model, spec(["0"], oft_block_size=2))


# --- LoRA + OFT, the facade ------------------------------------------------------------


def test_oft_and_lora_in_one_spec_match_peft_mixed_model() -> None:
    base = tiny_llama()
    oft = {
        "method": "oft",
        "oft_block_size": 8,
        "targets": {"kind": "names", "names": ["q_proj", "down_proj"]},
    }
    lora = {
        "method": "lora", "r": 2, "lora_alpha": 4, "init": "random",
        "targets": {"kind": "names", "names": ["q_proj", "k_proj"]},
    }  # fmt: skip
    ours = adaptc.compile(base, adaptc.load_spec({"version": 1, "adapters": {"o": oft, "l": lora}}))
    adaptc.set_active(ours, ["o", "l"])
    mixed = peft.get_peft_model(
        copy.deepcopy(base),
        peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"]),
        adapter_name="o",
        mixed=True,
    )
    mixed.add_adapter("l", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"]))
    mixed.set_adapter(["o", "l"])
    mixed.eval()
    share(mixed, ours, adapter="o")
    lora_b = {m.target: m for m in ours.modules() if type(m).__name__ == "LoraBranch"}
    with torch.no_grad():
        for name, p in mixed.named_parameters():
            if ".lora_A.l" in name or ".lora_B.l" in name:
                p.copy_(torch.randn_like(p) * 0.3)
                path = name.removeprefix(PREFIX).split(".lora_")[0]
                which = "lora_A" if ".lora_A." in name else "lora_B"
                getattr(lora_b[path], which).weight.copy_(p)
        torch.testing.assert_close(ours(input_ids=IDS).logits, mixed(input_ids=IDS).logits, **CLOSE)


def test_facade_config_and_get_peft_model_match_peft() -> None:
    from adaptc.peft import OFTConfig, get_peft_model  # type: ignore[attr-defined]

    assert [(f.name, f.default) for f in dataclasses.fields(OFTConfig)] == [
        (f.name, f.default) for f in dataclasses.fields(peft.OFTConfig)
    ]
    kwargs = {"task_type": "CAUSAL_LM", "target_modules": TARGETS, "oft_block_size": 8}
    assert OFTConfig(**kwargs).to_dict() == peft.OFTConfig(**kwargs).to_dict()
    with pytest.raises(ValueError, match="either r or oft_block_size"):
        OFTConfig(r=0, oft_block_size=0)
    base = tiny_llama()
    ours = get_peft_model(base, OFTConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kwargs)).eval()
    share(theirs, ours)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(input_ids=IDS).logits, theirs(input_ids=IDS).logits, **CLOSE
        )
