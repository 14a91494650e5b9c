"""LoHa against the real ``peft`` 0.21.2: a tiny Llama and a small CNN (Conv2d 3x3 and 1x1,
Conv1d, Linear), the same factors in both, equal outputs, gradients, merges, counts and
files; LoRA + LoHa in one spec against peft's ``PeftMixedModel``; the ``adaptc.peft``
facade's ``LoHaConfig``. Dropouts in eval only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from torch import nn

import adaptc
from adaptc.methods.loha.method import LoHaBranch
from adaptc.spec import from_peft_config

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
    adapter = {"method": "loha", "targets": {"kind": "names", "names": targets}, **fields}
    return adaptc.load_spec({"version": 1, "adapters": {"default": adapter}})


def branches(model: nn.Module) -> dict[str, LoHaBranch]:
    return {m.target: m for m in model.modules() if isinstance(m, LoHaBranch)}


def share(theirs: nn.Module, ours: nn.Module, adapter: str = "default") -> None:
    """Draw peft's factors randomly and copy them into adaptc's branches."""
    ours_b = branches(ours)
    seen = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".hada_" not in name or not name.endswith(f".{adapter}"):
                continue
            path, _, rest = name.removeprefix(PREFIX).partition(".hada_")
            p.copy_(torch.randn_like(p) * 0.3)
            getattr(ours_b[path], "hada_" + rest.removesuffix(f".{adapter}")).copy_(p)
            seen += 1
    assert seen and seen == sum(1 for b in ours_b.values() for _ in b.parameters())


CORES = {"conv1", "conv3"}  # the layers with cores under use_effective_conv2d


def path_of(name: str) -> str:
    return name.removeprefix(PREFIX).partition(".hada_")[0]


def run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if inputs.dtype == torch.long:
        return model(input_ids=inputs).logits  # type: ignore[no-any-return]
    return model(inputs)  # type: ignore[no-any-return]


CASES = {"llama": (tiny_llama, IDS, TARGETS), "cnn": (cnn, IMAGES, CNN_TARGETS)}
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"r": 2, "alpha": 4, "rank_pattern": {"down_proj": 3},
               "alpha_pattern": {"q_proj": 1}}),
    ("cnn", {"r": 2, "alpha": 4}),
    ("cnn", {"r": 2, "alpha": 3, "use_effective_conv2d": True}),  # conv1, conv3: cores
]  # fmt: skip


@pytest.mark.parametrize(("model", "options"), OPTIONS)
def test_outputs_gradients_merge_and_counts_match_peft(model: str, options: dict[str, Any]) -> None:
    build, inputs, targets = CASES[model]
    base = build()
    reference = run(base, inputs).detach()
    config = peft.LoHaConfig(target_modules=targets, **options)
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
        # peft 0.21.2's HadaWeightCP.backward swaps the rebuilt cores for w1_a and w2_a
        # (grad_w1a from t2's, grad_w2a from t1's): adaptc's autograd differs there
        swapped = options.get("use_effective_conv2d") and path_of(name) in CORES
        if ".hada_" in name and not (swapped and ".hada_w" in name and "_a." in name):
            path, _, rest = name.removeprefix(PREFIX).partition(".hada_")
            grad = getattr(ours_b[path], "hada_" + rest.removesuffix(".default")).grad
            torch.testing.assert_close(grad, p.grad, **CLOSE)
    for path, b in ours_b.items():
        assert all(p.grad is not None for p in b.parameters()), path
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


def test_shapes_match_peft() -> None:
    base = cnn()
    options = {"r": 2, "use_effective_conv2d": True}
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoHaConfig(target_modules=CNN_TARGETS, **options)
    )
    ours = adaptc.compile(base, spec(CNN_TARGETS, **options))
    want = {
        name.removeprefix(PREFIX).removesuffix(".default"): tuple(p.shape)
        for name, p in theirs.named_parameters()
        if ".hada_" in name
    }
    got = {
        f"{path}.{name}": tuple(p.shape)
        for path, b in branches(ours).items()
        for name, p in b.named_parameters()
    }
    assert got == want
    assert "hada_t1" in dict(branches(ours)["conv1"].named_parameters())  # 3x3: the cores
    assert "hada_t1" not in dict(branches(ours)["conv2"].named_parameters())  # 1x1: none


@pytest.mark.parametrize("init", [True, False])
def test_same_seed_same_factors_as_peft(init: bool) -> None:
    base = cnn()
    torch.manual_seed(3)
    config = peft.LoHaConfig(
        target_modules=CNN_TARGETS, r=2, init_weights=init, use_effective_conv2d=True
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    torch.manual_seed(3)
    name = "default" if init else "random"
    ours = adaptc.compile(base, spec(CNN_TARGETS, r=2, init=name, use_effective_conv2d=True)).eval()
    torch.testing.assert_close(run(ours, IMAGES), run(theirs, IMAGES), **CLOSE)
    if init:  # PEFT's init starts as a no-op
        assert torch.equal(run(ours, IMAGES), run(base, IMAGES))
    else:
        assert not torch.allclose(run(ours, IMAGES), run(base, IMAGES))


def test_dropouts_in_eval_match_peft() -> None:
    base = cnn()
    options = {"r": 2, "rank_dropout": 0.5, "module_dropout": 0.3}
    config = peft.LoHaConfig(target_modules=CNN_TARGETS, **options)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ours = adaptc.compile(base, spec(CNN_TARGETS, **options)).eval()
    share(theirs, ours)
    torch.testing.assert_close(run(ours, IMAGES), run(theirs, IMAGES), **CLOSE)
    evaluated = run(ours, IMAGES)
    ours.train()
    theirs.train()  # random in training: the same draws, in PEFT's order
    torch.manual_seed(7)
    got = run(ours, IMAGES)
    torch.manual_seed(7)
    torch.testing.assert_close(got, run(theirs, IMAGES), **CLOSE)
    assert not torch.allclose(got, evaluated)


def test_files_both_ways(tmp_path: Path) -> None:
    base = cnn()
    options = {"r": 2, "alpha": 3, "use_effective_conv2d": True}
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoHaConfig(target_modules=CNN_TARGETS, **options)
    ).eval()
    ours = adaptc.compile(base, spec(CNN_TARGETS, **options)).eval()
    share(theirs, ours)
    expected = run(theirs, IMAGES)
    adaptc.save_adapter(ours, tmp_path / "ours")
    read = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(run(read, IMAGES), expected, **CLOSE)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = adaptc.load_adapter(base, tmp_path / "theirs").eval()
    torch.testing.assert_close(run(loaded, IMAGES), expected, **CLOSE)


def test_config_both_ways_and_errors() -> None:
    options = {
        "r": 4, "alpha": 2, "rank_dropout": 0.1, "module_dropout": 0.2, "init_weights": False,
        "use_effective_conv2d": True, "rank_pattern": {"q_proj": 2}, "exclude_modules": ["o_proj"],
    }  # fmt: skip
    expected = peft.LoHaConfig(target_modules=TARGETS, **options).to_dict()
    expected = {
        k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in expected.items()
    }
    back = from_peft_config(expected)
    assert back.adapter().init == "random"
    assert back.to_peft_config() == expected
    with pytest.raises(adaptc.SpecError, match="'fancy' is not supported by adaptc for LoHa"):
        from_peft_config({"peft_type": "LOHA", "target_modules": ["q"], "fancy": 1})
    with pytest.raises(adaptc.SpecError, match=r"adapters\.default\.r"):
        spec(TARGETS, r=0)


def test_lora_and_loha_in_one_spec_match_peft_mixed_model() -> None:
    base = tiny_llama()
    lora = {
        "method": "lora", "r": 2, "lora_alpha": 4, "init": "random",
        "targets": {"kind": "names", "names": ["q_proj", "k_proj"]},
    }  # fmt: skip
    loha = {
        "method": "loha",
        "r": 2,
        "targets": {"kind": "names", "names": ["q_proj", "down_proj"]},
    }
    ours = adaptc.compile(
        base, adaptc.load_spec({"version": 1, "adapters": {"l": lora, "h": loha}})
    )
    adaptc.set_active(ours, ["l", "h"])
    mixed = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"]),
        adapter_name="l",
        mixed=True,
    )
    mixed.add_adapter("h", peft.LoHaConfig(r=2, target_modules=["q_proj", "down_proj"]))
    mixed.set_adapter(["l", "h"])
    mixed.eval()
    share(mixed, ours, adapter="h")
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
    with pytest.raises(ValueError, match=r"model\.embed_tokens.*LoHa does not support its type"):
        adaptc.compile(tiny_llama(), spec(["embed_tokens"]))


def test_facade_config_and_get_peft_model_match_peft() -> None:
    from adaptc.peft import LoHaConfig, get_peft_model  # type: ignore[attr-defined]

    ours_fields = [(f.name, f.default) for f in dataclasses.fields(LoHaConfig)]
    assert ours_fields == [(f.name, f.default) for f in dataclasses.fields(peft.LoHaConfig)]
    kwargs: dict[str, Any] = {"target_modules": TARGETS, "r": 2, "alpha": 4, "init_weights": False}
    assert LoHaConfig(**kwargs).to_dict() == peft.LoHaConfig(**kwargs).to_dict()
    base = tiny_llama()
    reference = run(base, IDS)
    torch.manual_seed(5)
    ours = get_peft_model(base, LoHaConfig(**kwargs)).eval()
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**kwargs)).eval()
    lines = []
    for model in (ours, theirs):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        lines.append(buffer.getvalue())
    assert lines[0] == lines[1]
    torch.testing.assert_close(run(ours, IDS), run(theirs, IDS), **CLOSE)
    assert torch.equal(run(base, IDS), reference)


def test_peft_effective_conv_backward_differs_only_for_w_a() -> None:
    """peft 0.21.2's ``HadaWeightCP.backward`` against autograd of its own forward: only
    ``w1_a``'s and ``w2_a``'s gradients differ (adaptc's are autograd's)."""
    from peft.tuners.loha.layer import HadaWeightCP

    torch.manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 8), (2, 4), (2, 2, 3, 3), (2, 8), (2, 4)]
    ts = [torch.randn(s, requires_grad=True) for s in shapes]
    g = torch.randn(8, 4, 3, 3)
    peft_grads = torch.autograd.grad(HadaWeightCP.apply(*ts, torch.tensor(1.5)), ts, g)
    e = "i j k l, j r, i p -> p r k l"
    out = torch.einsum(e, ts[0], ts[2], ts[1]) * torch.einsum(e, ts[3], ts[5], ts[4]) * 1.5
    true_grads = torch.autograd.grad(out, ts, g)
    same = [torch.allclose(a, b, atol=1e-4) for a, b in zip(peft_grads, true_grads, strict=True)]
    assert same == [True, False, True, True, False, True]
