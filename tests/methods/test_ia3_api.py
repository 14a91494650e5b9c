"""IA3 through adaptc's public API, against the real ``peft`` 0.21.2, on a tiny Llama.

compile, trainable counts, merge, save (read by peft) and load (of peft's files), the
original model left alone, and the ``adaptc.peft`` facade's ``IA3Config``. These need the
method registered (``"ia3"`` in :data:`adaptc.methods.NAMES`).
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
from adaptc.methods.ia3.method import IA3Branch
from adaptc.spec import from_peft_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
TARGETS = ["k_proj", "v_proj", "down_proj"]
FEEDFORWARD = ["down_proj"]
SPEC: dict[str, Any] = {
    "version": 1,
    "adapters": {
        "default": {
            "method": "ia3",
            "targets": {"kind": "names", "names": TARGETS},
            "feedforward": {"kind": "names", "names": FEEDFORWARD},
        }
    },
}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 9, 27, 3, 100, 64, 2], [7, 7, 1, 0, 12, 4, 90, 31]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # type: ignore[no-any-return]


def peft_model(base: nn.Module) -> Any:
    config = peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=TARGETS, feedforward_modules=FEEDFORWARD
    )
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def ours_branches(model: nn.Module) -> dict[str, IA3Branch]:
    return {m.target: m for m in model.modules() if isinstance(m, IA3Branch)}


def peft_vectors(model: Any) -> dict[str, nn.Parameter]:
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix).removesuffix(".ia3_l.default"): p
        for name, p in model.named_parameters()
        if name.endswith(".ia3_l.default")
    }


def randomize_and_share(theirs: Any, ours: nn.Module, seed: int = 0) -> None:
    """'Train' PEFT's vectors (random values), then give adaptc's branches the same."""
    gen = torch.Generator().manual_seed(seed)
    vectors = peft_vectors(theirs)
    branches = ours_branches(ours)
    assert sorted(vectors) == sorted(branches) and len(vectors) == 6
    with torch.no_grad():
        for path, p in vectors.items():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            mine = branches[path].ia3_l
            assert mine.shape == p.shape and mine.dtype == p.dtype
            mine.copy_(p)


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": {n: (id(p), p.requires_grad, p.clone()) for n, p in model.named_parameters()},
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modules"] == after["modules"]
    assert before["attrs"] == after["attrs"]
    assert before["params"].keys() == after["params"].keys()
    for name, (i, rg, value) in before["params"].items():
        i2, rg2, value2 = after["params"][name]
        assert (i, rg) == (i2, rg2) and torch.equal(value, value2), name


def file_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


@pytest.fixture
def pair() -> tuple[nn.Module, nn.Module, Any]:
    base = tiny_llama()
    ours = adaptc.compile(base, adaptc.load_spec(SPEC))
    theirs = peft_model(base)
    randomize_and_share(theirs, ours)
    return base, ours, theirs


def test_spec_loads_and_converts_to_peft_s_config() -> None:
    spec = adaptc.load_spec(SPEC)
    expected = peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=TARGETS, feedforward_modules=FEEDFORWARD
    ).to_dict()
    expected = {
        k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in expected.items()
    }
    with_task = adaptc.load_spec({**SPEC, "task_type": "CAUSAL_LM"})
    assert with_task.to_peft_config() == expected
    back = from_peft_config(expected)  # (names sorted, as PEFT's sets have no order)
    assert back.to_peft_config() == expected
    assert back.adapter().feedforward == with_task.adapter().feedforward
    assert spec.adapter().method == "ia3"


def test_spec_errors_name_the_field() -> None:
    bad = copy.deepcopy(SPEC)
    bad["adapters"]["default"]["targets"]["names"] = ["k_proj"]
    with pytest.raises(
        adaptc.SpecError, match=r"adapters\.default\.feedforward\.names: 'down_proj'"
    ):
        adaptc.load_spec(bad)
    cfg = {"peft_type": "IA3", "target_modules": ["q"], "layers_to_transform": [0]}
    with pytest.raises(adaptc.SpecError, match="layers_to_transform: 'layers_to_transform' is not"):
        from_peft_config(cfg)


def test_compiled_logits_and_counts_match_peft(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    base, ours, theirs = pair
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    torch.testing.assert_close(logits(ours), expected, **EXACT)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_merge_matches_peft(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    _, ours, theirs = pair
    merged = adaptc.merge(ours)
    expected = logits(theirs.merge_and_unload())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_saved_adapter_is_read_by_peft(
    pair: tuple[nn.Module, nn.Module, Any], tmp_path: Path
) -> None:
    base, ours, theirs = pair
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_type", "target_modules", "feedforward_modules", "init_ia3_weights"):
        value, ref = config[key], reference[key]
        assert (sorted(value) if isinstance(value, list) else value) == (
            sorted(ref) if isinstance(ref, list) else ref
        ), key
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded), logits(theirs), **EXACT)


def test_peft_saved_adapter_loads(pair: tuple[nn.Module, nn.Module, Any], tmp_path: Path) -> None:
    base, _, theirs = pair
    theirs.save_pretrained(str(tmp_path))
    loaded = adaptc.load_adapter(base, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(theirs), **EXACT)


@pytest.mark.parametrize("init", ["ones", "random"])
def test_same_seed_same_vectors_as_peft(init: str) -> None:
    base = tiny_llama()
    spec = copy.deepcopy(SPEC)
    spec["adapters"]["default"]["init"] = init
    torch.manual_seed(3)
    ours = adaptc.compile(base, adaptc.load_spec(spec))
    after_ours = torch.randn(3)
    torch.manual_seed(3)
    config = peft.IA3Config(
        target_modules=TARGETS, feedforward_modules=FEEDFORWARD, init_ia3_weights=init == "ones"
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    after_theirs = torch.randn(3)
    branches = ours_branches(ours)
    for path, vector in peft_vectors(theirs).items():
        assert torch.equal(branches[path].ia3_l, vector), path
    assert torch.equal(after_ours, after_theirs)


def test_original_model_is_untouched(tmp_path: Path) -> None:
    base = tiny_llama()
    before = snapshot(base)
    reference = logits(base)
    ours = adaptc.compile(base, adaptc.load_spec(SPEC))
    randomize_and_share(peft_model(base), ours)
    logits(ours)
    adaptc.merge(ours)
    adaptc.save_adapter(ours, tmp_path)
    assert_same(before, snapshot(base))
    assert torch.equal(logits(base), reference)


def test_default_feedforward_for_the_model_type() -> None:
    # IA3Config(target_modules=[k_proj, v_proj]) on llama: PEFT makes down_proj feed-forward
    # by default, which is no target here, so every target scales its output
    base = tiny_llama()
    spec = copy.deepcopy(SPEC)
    spec["adapters"]["default"] = {"method": "ia3"}  # targets and feedforward: PEFT's defaults
    ours = adaptc.compile(base, adaptc.load_spec(spec))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM"))
    randomize_and_share(theirs.eval(), ours)
    assert {p: b.feedforward for p, b in ours_branches(ours).items()} == {
        p: p.endswith("down_proj") for p in peft_vectors(theirs)
    }
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=128, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_compile_save_and_load_match_peft(tmp_path: Path) -> None:
    base = tiny_gpt2()
    spec = {
        "version": 1,
        "task_type": "CAUSAL_LM",
        "adapters": {
            "default": {
                "method": "ia3",
                "targets": {"kind": "names", "names": ["c_attn", "mlp.c_proj"]},
                "feedforward": {"kind": "names", "names": ["mlp.c_proj"]},
            }
        },
    }
    ours = adaptc.compile(base, adaptc.load_spec(spec))
    config = peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
        feedforward_modules=["mlp.c_proj"],
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    vectors = peft_vectors(theirs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, p in vectors.items():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            ours_branches(ours)[path].ia3_l.copy_(p)
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)
    merged = logits(adaptc.merge(ours))
    torch.testing.assert_close(merged, logits(copy.deepcopy(theirs).merge_and_unload()), **EXACT)

    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is reference["fan_in_fan_out"] is True  # PEFT forces it
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(loaded.eval()), logits(theirs), **EXACT)
    back = adaptc.load_adapter(base, tmp_path / "theirs")
    torch.testing.assert_close(logits(back), logits(theirs), **EXACT)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def test_cnn_compile_and_merge_match_peft() -> None:
    torch.manual_seed(0)
    base = CNN().eval()
    spec = {
        "version": 1,
        "adapters": {
            "default": {
                "method": "ia3",
                "targets": {"kind": "types", "types": ["nn.Conv2d"]},
                "feedforward": {"kind": "regex", "pattern": "conv2"},
                "modules_to_save": ["head"],
            }
        },
    }
    ours = adaptc.compile(base, adaptc.load_spec(spec))
    config = peft.IA3Config(
        target_modules=["conv1", "conv2"], feedforward_modules="conv2", modules_to_save=["head"]
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for path, p in peft_vectors(theirs).items():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            ours_branches(ours)[path].ia3_l.copy_(p)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **EXACT)
        assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
        merged = adaptc.merge(ours)(x)
        torch.testing.assert_close(merged, theirs.merge_and_unload()(x), rtol=1e-5, atol=1e-5)


# --- the adaptc.peft facade ------------------------------------------------------------------


def test_facade_config_has_peft_s_arguments() -> None:
    from adaptc.peft import IA3Config  # type: ignore[attr-defined]

    ours = [(f.name, f.default) for f in dataclasses.fields(IA3Config)]
    theirs = [(f.name, f.default) for f in dataclasses.fields(peft.IA3Config)]
    assert ours == theirs
    kwargs = {"target_modules": TARGETS, "feedforward_modules": FEEDFORWARD}
    assert IA3Config(**kwargs).to_dict() == peft.IA3Config(**kwargs).to_dict()
    with pytest.raises(ValueError, match="feed-forward modules must be targets"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_facade_get_peft_model_matches_peft() -> None:
    from adaptc.peft import IA3Config, get_peft_model  # type: ignore[attr-defined]

    base = tiny_llama()
    kwargs = {
        "task_type": "CAUSAL_LM",
        "target_modules": TARGETS,
        "feedforward_modules": FEEDFORWARD,
    }
    ours = get_peft_model(base, IA3Config(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    lines = []
    for model in (ours, theirs):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        lines.append(buffer.getvalue())
    assert lines[0] == lines[1]
    randomize_and_share(theirs.eval(), ours)
    torch.testing.assert_close(logits(ours.eval()), logits(theirs), **EXACT)
