"""A tiny quantized Llama and its PEFT twin, for the parity tests of the quantized kinds.

``tiny_llama`` is ``tiny_hf("llama")`` with hidden size 64 (the smallest that torchao's int4
groups of 32 and HQQ's groups of 64 divide: k/v projections are (32, 64)). ``pair`` quantizes
two copies the same way, wraps one with the real ``peft`` (``init_lora_weights=False``: B is
random, so the update is not zero), saves its adapter and loads it with ``adaptc.peft``
onto the other.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc.peft as ap
from tests.compiler.models import hf_inputs

Quantize = Callable[[nn.Module], None]  # quantizes a float model in place

TOL = {"rtol": 1e-5, "atol": 1e-6}
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
          "init_lora_weights": False}  # fmt: skip
TARGETS = 6  # 3 per layer, 2 layers


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings, no progress bars (HQQ prints one per model)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def tiny_llama(quantize: Quantize) -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(cfg)
    with quiet():
        quantize(model)
    return model.eval()


def pair(quantize: Quantize, tmp_path: Path, **config: Any) -> tuple[nn.Module, Any, Any]:
    """(adaptc's base, peft's model, adaptc's model) with the same adapter weights."""
    torch.manual_seed(1)
    with quiet():
        theirs = peft.get_peft_model(tiny_llama(quantize), peft.LoraConfig(**CONFIG, **config))
    theirs.save_pretrained(tmp_path / "adapter")
    base = tiny_llama(quantize)
    mine = ap.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    return base, theirs, mine


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), quiet():
        return model(**hf_inputs("llama")).logits  # type: ignore[no-any-return]


def lora_grads(model: nn.Module) -> list[float]:
    """The norms of the gradients of a loss, sorted (one per LoRA factor)."""
    model.train()
    with quiet():
        model(**hf_inputs("llama")).logits.square().mean().backward()
    return sorted(p.grad.norm().item() for p in model.parameters() if p.grad is not None)


def assert_parity(theirs: Any, mine: Any) -> None:
    """Outputs, trainable counts and LoRA gradients equal PEFT's."""
    torch.testing.assert_close(logits(mine), logits(theirs), **TOL)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    grads = [lora_grads(model) for model in (theirs, mine)]
    assert len(grads[0]) == len(grads[1]) == 2 * TARGETS
    torch.testing.assert_close(torch.tensor(grads[1]), torch.tensor(grads[0]), **TOL)


def assert_files_both_ways(quantize: Quantize, theirs: Any, mine: Any, tmp_path: Path) -> None:
    """adaptc's saved adapter, loaded by peft onto a fresh base, gives peft's outputs."""
    mine.save_pretrained(tmp_path / "ours")
    with quiet():
        again = peft.PeftModel.from_pretrained(tiny_llama(quantize), tmp_path / "ours")
    torch.testing.assert_close(logits(again), logits(theirs), **TOL)


def layer_and_branch(model: Any, path: str = "model.layers.0.self_attn.q_proj") -> tuple[Any, Any]:
    """adaptc's base layer at ``path`` (unwrapped) and its LoRA branch."""
    layer = model.get_base_model().get_submodule(path)
    layer = getattr(layer, "base_layer", layer)
    branch = next(m for m in layer.children() if hasattr(m, "lora_A"))
    return layer, branch


def expected_merge(weight: torch.Tensor, branch: Any) -> torch.Tensor:
    """``W_deq + s·B·A``."""
    delta = branch.lora_B.weight @ branch.lora_A.weight
    return weight + branch.scaling * delta.to(weight.dtype)


def spec(**adapter: Any) -> dict[str, Any]:
    """An adaptc spec with one adapter on the q projections."""
    targets = {"kind": "names", "names": ["q_proj"]}
    return {"version": 1, "adapters": {"default": {"r": 4, "targets": targets, **adapter}}}


def inner(weight: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a tensor subclass is made of (torchao's qdata, scale, …;
    quanto's _data, _scale, _shift)."""
    names, _ = weight.__tensor_flatten__()  # type: ignore[attr-defined]
    return [getattr(weight, n) for n in names]


def assert_merging_in_place_is_refused(mine: Any) -> None:
    """``merge_adapter()`` raises and leaves the outputs as they were."""
    before = logits(mine)
    with pytest.raises(ValueError, match="cannot be merged in place"):
        mine.merge_adapter()
    torch.testing.assert_close(logits(mine), before, rtol=0, atol=0)


def assert_refused(build: Callable[[], nn.Module], cases: list[tuple[dict[str, Any], str]]) -> None:
    """Compiling ``spec(**extra)`` onto a fresh ``build()`` fails with ``match`` each time."""
    import adaptc

    for extra, match in cases:
        with pytest.raises(adaptc.CompileError, match=match):
            adaptc.compile(build(), spec(**extra))
