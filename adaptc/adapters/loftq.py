"""LoftQ on a compiled model with a quantized base (PEFT's ``replace_lora_weights_loftq``),
and the approximation error of any LoftQ-initialised adapter.

:func:`initialize_loftq` sets the LoRA factors of every quantized target layer (bitsandbytes
4-bit, as PEFT; also the other quantized kinds, whose weights adaptc dequantizes the same
way) to the rank-``r`` SVD of ``W - Q``: ``W`` the float weight (from a checkpoint, a state
dict or the float model), ``Q`` the layer's dequantized weight. The base stays as loaded.
Non-quantized targets are left alone. It changes the compiled model's adapter weights in
place (never the user's model), and returns each layer's :class:`LoftqError`; a
``callback(model, path)`` returning False undoes a layer's replacement, as in PEFT.

:func:`loftq_errors` measures, for each target of an adapter, how well the compiled
model's base weight plus the update approximates the float weight: after ``init: loftq``
(compare with the untouched original model) as after :func:`initialize_loftq`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from adaptc.adapters.manage import _layers_by_original_path
from adaptc.compiler import Compiled, CompileError, compiled
from adaptc.layers import LayerKind, kind_of
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.linear import LinearRule
from adaptc.methods.lora.loftq import LoftqError, loftq_error, loftq_factors, log_error
from adaptc.methods.lora.method import METHOD

__all__ = ["FloatWeights", "initialize_loftq", "loftq_errors"]

# the float weights: a state dict (or a model) of the original, or name -> tensor
FloatWeights = Mapping[str, torch.Tensor] | nn.Module | Callable[[str], torch.Tensor]


@torch.no_grad()
def initialize_loftq(
    model: nn.Module,
    weights: FloatWeights,
    *,
    adapter: str | None = None,
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, LoftqError]:
    """LoftQ factors for the quantized target layers of ``adapter`` (default: the first
    active), in place; ``{path: error}`` for the layers whose factors were replaced.

    ``weights`` gives the float weight ``"<path>.weight"`` of a target (a state dict, the
    float model, or a function of the name)."""
    info = compiled(model, "initialize_loftq()")
    name = _adapter(info, adapter)
    read = _reader(weights)
    errors: dict[str, LoftqError] = {}
    for path, layer, kind, branch in _branches(model, info, name):
        if not kind.quantized:
            continue
        A, B = branch.factors()
        if branch.r > min(A.shape[1], B.shape[0]):
            raise ValueError(
                f"{path}: r={branch.r} is larger than LoftQ can fill "
                f"(min(in, out) = {min(A.shape[1], B.shape[0])})"
            )
        base = kind.weight(layer)
        weight = read(f"{path}.weight")
        if tuple(weight.shape) != tuple(base.shape):
            raise ValueError(
                f"{path}.weight: the float weight has shape {tuple(weight.shape)}, the "
                f"layer's {tuple(base.shape)}"
            )
        a, b = loftq_factors(base, weight, branch.r)
        before = (A.clone(), B.clone())
        A.copy_(a)
        B.copy_(b)
        if callback is not None and not callback(model, path):
            A.copy_(before[0])
            B.copy_(before[1])
            continue
        errors[path] = loftq_error(weight, base, A, B, branch.scaling)
        log_error(path, errors[path])
    if not errors and not any(k.quantized for _, _, k, _ in _branches(model, info, name)):
        raise ValueError(
            f"No bnb LoRA module found on the model: adapter {name!r} has no target on a "
            "quantized layer (for a float model, use init: loftq)"
        )
    return errors


@torch.no_grad()
def loftq_errors(
    model: nn.Module, weights: FloatWeights, *, adapter: str | None = None
) -> dict[str, LoftqError]:
    """``{path: error}`` of ``adapter``'s linear targets: ``W`` from ``weights`` against the
    compiled model's base weight (dequantized) plus ``s·B·A``."""
    info = compiled(model, "loftq_errors()")
    name = _adapter(info, adapter)
    read = _reader(weights)
    errors = {}
    for path, layer, kind, branch in _branches(model, info, name):
        A, B = branch.factors()
        if not isinstance(METHOD.rules.get(kind.name), LinearRule):
            continue
        base = kind.weight(layer)
        if kind.transposed(layer, branch.fan_in_fan_out):
            base = base.T
        weight = read(f"{path}.weight")
        if kind.transposed(layer, branch.fan_in_fan_out):
            weight = weight.T
        errors[path] = loftq_error(weight, base, A, B, branch.scaling)
    return errors


def _adapter(info: Compiled, adapter: str | None) -> str:
    name = adapter if adapter is not None else (info.active or tuple(info.spec.adapters))[0]
    if name not in info.spec.adapters:
        raise CompileError(
            f"the model has no adapter {name!r} (has: {', '.join(info.spec.adapters)})"
        )
    if info.spec.adapters[name].method != "lora":
        raise CompileError(
            f"adapter {name!r} is a {info.spec.adapters[name].method} adapter: LoftQ is for LoRA"
        )
    return name


def _branches(
    model: nn.Module, info: Compiled, name: str
) -> list[tuple[str, nn.Module, LayerKind, LoraBranch]]:
    layers = _layers_by_original_path(model)
    child = METHOD.child_name(name)
    out = []
    for target in info.plan.targets:
        if target.adapter != name:
            continue
        layer = layers[target.path]
        branch = layer._modules.get(child)
        if isinstance(branch, LoraBranch):
            out.append((target.path, layer, kind_of(layer, target.path), branch))
    return out


def _reader(weights: FloatWeights) -> Callable[[str], torch.Tensor]:
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    if isinstance(weights, Mapping):
        table: Mapping[str, Any] = weights

        def read(key: str) -> torch.Tensor:
            if key not in table:
                raise KeyError(f"the float weights have no {key!r}")
            tensor: torch.Tensor = table[key]
            return tensor

        return read
    return weights
