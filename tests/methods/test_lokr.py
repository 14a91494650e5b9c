"""LoKr against the real ``peft`` 0.21.2: a tiny Llama and a small CNN (Conv2d 3x3 and 1x1,
Conv1d, Linear), the same factors in both, equal outputs, gradients, merges, counts and
files; LoRA + LoKr in one spec against peft's ``PeftMixedModel``. Dropouts in eval only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from torch import nn

import adaptc
from adaptc.methods.lokr.method import LoKrBranch, factorization

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CLOSE: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}
TARGETS = ["q_proj", "v_proj", "down_proj"]
PREFIX = "base_model.model."
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
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 1)
        self.conv3 = nn.Conv1d(12, 6, 3, stride=2)
        self.head = nn.Linear(6 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 12, 4, 4)
        h = self.conv3(h.flatten(2))  # (B, 6, 7)
        return self.head(h.flatten(1))  # type: ignore[no-any-return]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN().eval()


IMAGES = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
CNN_TARGETS = ["conv1", "conv2", "conv3", "head"]


def spec(targets: list[str], **fields: Any) -> adaptc.Spec:
    adapter = {"method": "lokr", "targets": {"kind": "names", "names": targets}, **fields}
    return adaptc.load_spec({"version": 1, "adapters": {"default": adapter}})


def branches(model: nn.Module) -> dict[str, LoKrBranch]:
    return {m.target: m for m in model.modules() if isinstance(m, LoKrBranch)}


def share(theirs: nn.Module, ours: nn.Module, adapter: str = "default") -> None:
    """Copy peft's factors (after drawing them randomly) into adaptc's branches."""
    ours_b = branches(ours)
    seen = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lokr_" not in name or not name.endswith(f".{adapter}"):
                continue
            path, _, rest = name.removeprefix(PREFIX).partition(".lokr_")
            p.copy_(torch.randn_like(p) * 0.3)
            getattr(ours_b[path], "lokr_" + rest.removesuffix(f".{adapter}")).copy_(p)
            seen += 1
    assert seen and seen == sum(1 for b in ours_b.values() for _ in b.parameters())


def run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if inputs.dtype == torch.long:
        return model(input_ids=inputs).logits  # type: ignore[no-any-return]
    return model(inputs)  # type: ignore[no-any-return]


CASES = {
    "llama": (tiny_llama, IDS, TARGETS),
    "cnn": (cnn, IMAGES, CNN_TARGETS),
    "cnn2d": (cnn, IMAGES, ["conv1", "conv2", "head"]),
}
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"r": 1, "alpha": 3, "decompose_both": True, "decompose_factor": 4,
               "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"q_proj": 2}}),
    ("cnn", {"r": 2, "alpha": 4}),
    # peft 0.21.2 fails on a Conv1d (kernel > 1) with use_effective_conv2d: conv3 left out
    ("cnn2d", {"r": 1, "alpha": 2, "use_effective_conv2d": True, "decompose_both": True}),
    ("cnn", {"r": 8, "alpha": 2}),  # every w2 full
]  # fmt: skip


@pytest.mark.parametrize(("model", "options"), OPTIONS)
def test_outputs_gradients_merge_and_counts_match_peft(model: str, options: dict[str, Any]) -> None:
    build, inputs, targets = CASES[model]
    base = build()
    reference = run(base, inputs).detach()
    config = peft.LoKrConfig(target_modules=targets, **options)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ours = adaptc.compile(base, spec(targets, **options)).eval()
    share(theirs, ours)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    got, expected = run(ours, inputs), run(theirs, inputs)
    torch.testing.assert_close(got, expected, **CLOSE)
    assert not torch.allclose(got, reference)
    got.square().mean().backward()
    expected.square().mean().backward()
    ours_b = branches(ours)
    for name, p in theirs.named_parameters():
        if ".lokr_" in name:
            path, _, rest = name.removeprefix(PREFIX).partition(".lokr_")
            grad = getattr(ours_b[path], "lokr_" + rest.removesuffix(".default")).grad
            torch.testing.assert_close(grad, p.grad, **CLOSE)
    with torch.no_grad():
        merged = adaptc.merge(ours)
        assert not branches(merged)
        torch.testing.assert_close(run(merged, inputs), got, **CLOSE)
        torch.testing.assert_close(run(merged, inputs), run(theirs.merge_and_unload(), inputs))
        adaptc.merge_in_place(ours)
        torch.testing.assert_close(run(ours, inputs), got, **CLOSE)
        adaptc.unmerge_in_place(ours)
        assert torch.equal(run(ours, inputs), got)
        assert torch.equal(run(base, inputs), reference)  # the user's model untouched


def test_shapes_are_peft_factorization() -> None:
    assert [factorization(n) for n in (256, 128, 127, 64, 12)] == [
        (16, 16), (8, 16), (1, 127), (8, 8), (3, 4)
    ]  # fmt: skip
    assert factorization(128, 4) == (4, 32) and factorization(12, 5) == (3, 4)
    base = cnn()
    options = {"r": 1, "use_effective_conv2d": True, "decompose_both": True}
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoKrConfig(target_modules=CNN_TARGETS, **options)
    )
    ours = adaptc.compile(base, spec(CNN_TARGETS, **options))
    want = {
        name.removeprefix(PREFIX).removesuffix(".default"): tuple(p.shape)
        for name, p in theirs.named_parameters()
        if ".lokr_" in name
    }
    got = {
        f"{path}.{name}": tuple(p.shape)
        for path, b in branches(ours).items()
        for name, p in b.named_parameters()
    }
    assert got == want
    assert "lokr_t2" in dict(branches(ours)["conv1"].named_parameters())  # 3x3: the core
    assert "lokr_t2" not in dict(branches(ours)["conv2"].named_parameters())  # 1x1: none


@pytest.mark.parametrize("init", [True, "lycoris", False])
def test_same_seed_same_factors_as_peft(init: bool | str) -> None:
    base = cnn()
    torch.manual_seed(3)
    config = peft.LoKrConfig(target_modules=CNN_TARGETS, r=2, init_weights=init)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    torch.manual_seed(3)
    name = {True: "default", "lycoris": "lycoris", False: "random"}[init]
    ours = adaptc.compile(base, spec(CNN_TARGETS, r=2, init=name)).eval()
    torch.testing.assert_close(run(ours, IMAGES), run(theirs, IMAGES), **CLOSE)
    if init is not False:  # PEFT's inits start as a no-op
        assert torch.equal(run(ours, IMAGES), run(base, IMAGES))


def test_dropouts_in_eval_match_peft() -> None:
    base = cnn()
    options = {"r": 2, "rank_dropout": 0.5, "module_dropout": 0.3, "rank_dropout_scale": True}
    config = peft.LoKrConfig(target_modules=CNN_TARGETS, **options)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ours = adaptc.compile(base, spec(CNN_TARGETS, **options)).eval()
    share(theirs, ours)
    assert all(b.lokr_dropout is not None for b in branches(ours).values())
    torch.testing.assert_close(run(ours, IMAGES), run(theirs, IMAGES), **CLOSE)


def test_files_both_ways(tmp_path: Path) -> None:
    base = cnn()
    options = {"r": 1, "alpha": 2, "use_effective_conv2d": True, "decompose_both": True}
    targets = CASES["cnn2d"][2]
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoKrConfig(target_modules=targets, **options)
    ).eval()
    ours = adaptc.compile(base, spec(targets, **options)).eval()
    share(theirs, ours)
    expected = run(theirs, IMAGES)
    adaptc.save_adapter(ours, tmp_path / "ours")
    read = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(run(read, IMAGES), expected, **CLOSE)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = adaptc.load_adapter(base, tmp_path / "theirs").eval()
    torch.testing.assert_close(run(loaded, IMAGES), expected, **CLOSE)


def test_lora_and_lokr_in_one_spec_match_peft_mixed_model() -> None:
    base = tiny_llama()
    lora = {
        "method": "lora", "r": 2, "lora_alpha": 4, "init": "random",
        "targets": {"kind": "names", "names": ["q_proj", "k_proj"]},
    }  # fmt: skip
    lokr = {
        "method": "lokr",
        "r": 2,
        "targets": {"kind": "names", "names": ["q_proj", "down_proj"]},
    }
    ours = adaptc.compile(
        base, adaptc.load_spec({"version": 1, "adapters": {"l": lora, "k": lokr}})
    )
    adaptc.set_active(ours, ["l", "k"])
    mixed = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"]),
        adapter_name="l",
        mixed=True,
    )
    mixed.add_adapter("k", peft.LoKrConfig(r=2, target_modules=["q_proj", "down_proj"]))
    mixed.set_adapter(["l", "k"])
    mixed.eval()
    share(mixed, ours, adapter="k")
    lora_b = {m.target: m for m in ours.modules() if type(m).__name__ == "LoraBranch"}
    with torch.no_grad():
        for name, p in mixed.named_parameters():
            if ".lora_A.l" in name or ".lora_B.l" in name:
                p.copy_(torch.randn_like(p) * 0.3)
                path = name.removeprefix(PREFIX).split(".lora_")[0].removesuffix(".base_layer")
                which = "lora_A" if ".lora_A." in name else "lora_B"
                getattr(lora_b[path], which).weight.copy_(p)
        alone = run(
            adaptc.compile(base, adaptc.load_spec({"version": 1, "adapters": {"l": lora}})), IDS
        )
        assert not torch.allclose(run(ours, IDS), alone)
        torch.testing.assert_close(run(ours, IDS), mixed(input_ids=IDS).logits, **CLOSE)


def test_unsupported_layer_is_refused_naming_it() -> None:
    with pytest.raises(
        ValueError,
        match=r"model\.embed_tokens.*LoKr does not support its type; supported: nn\.Linear",
    ):
        adaptc.compile(tiny_llama(), spec(["embed_tokens"]))


def test_effective_conv1d_works_where_peft_fails() -> None:
    """peft's make_kron raises on Conv1d's (b, d, k, 1) core; adaptc computes the same
    values, ``kron(w1, einsum(t2, w2_a, w2_b))`` reshaped to the weight (checked by hand)."""
    base = cnn()
    ours = adaptc.compile(
        base, spec(["conv3"], r=1, alpha=2, init="random", use_effective_conv2d=True)
    )
    b = branches(ours)["conv3"]
    with torch.no_grad():
        w2 = torch.einsum(
            "ijk,ip,jr->prk", b.lokr_t2[..., 0], b.lokr_w2_a, b.lokr_w2_b
        )  # (3, 4, 3)
        w1 = b.lokr_w1  # (2, 3)
        by_hand = 2.0 * torch.einsum("ac,bdk->abcdk", w1, w2).reshape(6, 12, 3)
        torch.testing.assert_close(b.delta_weight(), by_hand)
        torch.testing.assert_close(run(adaptc.merge(ours), IMAGES), run(ours, IMAGES), **CLOSE)
