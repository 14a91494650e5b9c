"""Compile a spec with adaptc and the same config with real peft; share the adapter weights."""

from __future__ import annotations

import copy
from typing import Any

import peft
import torch
from torch import nn

import adaptc
from adaptc.methods.lora.branch import LoraBranch

_META_KEYS = ("peft_type", "peft_version", "auto_mapping", "runtime_config")


def peft_config(spec: adaptc.Spec, adapter: str | None = None) -> peft.LoraConfig:
    cfg = spec.to_peft_config(adapter)
    return peft.LoraConfig(**{k: v for k, v in cfg.items() if k not in _META_KEYS})


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers by the path of the module they replaced."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            out[name.removeprefix("base_model.model.")] = module
    return out


def branches(model: nn.Module) -> dict[tuple[str, str], LoraBranch]:
    return {(b.target, b.adapter): b for b in model.modules() if isinstance(b, LoraBranch)}


@torch.no_grad()
def share_adapter_weights(peft_model: nn.Module, compiled: nn.Module, seed: int = 0) -> int:
    """Give PEFT's adapters random non-zero values and copy them into adaptc's branches."""
    gen = torch.Generator().manual_seed(seed)
    layers = lora_layers(peft_model)
    count = 0
    for (target, adapter), branch in branches(compiled).items():
        layer = layers[target]
        theirs = {
            k.replace(f".{adapter}", "", 1): v
            for k, v in layer.state_dict().items()
            if f".{adapter}" in k or k.endswith(f"_{adapter}")
        }
        ours = dict(branch.named_parameters())
        for key, param in ours.items():
            src = theirs[key] if key in theirs else theirs[f"{key}.weight"]
            fresh = torch.randn(src.shape, generator=gen) * 0.1
            src.copy_(fresh)
            param.copy_(fresh)
            count += 1
    return count


def build_pair(model: nn.Module, spec_data: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    spec = adaptc.load_spec(spec_data)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    compiled = adaptc.compile(model, spec)
    share_adapter_weights(peft_model, compiled)
    return peft_model, compiled


def output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0]


def adapter_grads(model: nn.Module) -> dict[tuple[str, str, str], torch.Tensor]:
    grads = {}
    for (target, adapter), branch in branches(model).items():
        for name, p in branch.named_parameters():
            assert p.grad is not None, f"{target}.{name} has no gradient"
            grads[(target, adapter, name)] = p.grad.clone()
    return grads


def peft_grads(peft_model: nn.Module, like: dict[tuple[str, str, str], torch.Tensor]):
    layers = lora_layers(peft_model)
    out = {}
    for target, adapter, name in like:
        module = layers[target]
        params = dict(module.named_parameters())
        head, _, tail = name.partition(".")
        key = f"{head}.{adapter}.{tail}" if tail else f"{head}.{adapter}"
        param = params[key] if key in params else params[f"{key}.weight"]  # DoRA magnitude
        out[(target, adapter, name)] = param.grad.clone()
    return out
