"""Any adapter served as LoRA: each layer's ``ΔW`` as LoRA factors by truncated SVD.

Serving engines read LoRA only. :func:`to_lora` takes a compiled model, asks each
adapted layer's method for its merged weight (the same ``merge`` rule ``adaptc.merge``
uses, so additive and multiplicative methods alike), and factors the update
``ΔW = W' − W`` per layer::

    ΔW = U·S·Vᵀ  ≈  B·A,   B = U[:, :k]·S[:k]   (out, k),   A = Vᵀ[:k]   (k, in)

with ``lora_alpha = r = k`` per layer, so the LoRA scaling is 1 (as peft's
``convert_to_lora``). The relative error of a layer is ``‖ΔW − B·A‖_F / ‖ΔW‖_F =
√(Σ_{i≥k} sᵢ²) / √(Σ sᵢ²)``. ``rank`` fixes ``k`` (capped at the layer's full rank);
``max_error`` picks the smallest ``k`` per layer whose error is within it (``rank`` then
caps it). A layer whose update is zero is left out. A change of the layer's bias (IA3,
BOFT scale it) is carried exactly by LoRA's ``lora_bias`` (a bias on ``lora_B``).

Layouts: ``nn.Linear``; transformers' ``Conv1D`` (``(in, out)`` weights, factored in that
layout and transposed, as peft does); ``nn.Conv1d/2d/3d`` without groups (``A`` is the
``(k, in, *kernel)`` convolution, ``B`` the ``1×…×1`` one); ``nn.Embedding``
(``lora_embedding_A (k, num)``, ``lora_embedding_B (dim, k)``). Quantized layers use
their dequantized weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptc.adapters.keys import saved_modules, target_layers
from adaptc.compiler import compile, compiled, compiled_info
from adaptc.layers import kind_of
from adaptc.methods.registry import branches_of, method_of
from adaptc.spec import Spec, load_spec

__all__ = ["LayerConversion", "LoraConversion", "ToLoraError", "to_lora"]

_CONV = ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d")
_MATRIX = ("nn.Linear", "transformers.Conv1D")


class ToLoraError(ValueError):
    """An adapter cannot be served as LoRA (a layer kind, option or method without a
    LoRA equivalent)."""


@dataclass(frozen=True)
class LayerConversion:
    """One layer of a conversion: its LoRA rank, out of the update's full rank, and the
    relative Frobenius error of the truncation."""

    path: str
    rank: int
    full_rank: int
    error: float
    bias: bool  # the update changes the layer's bias (carried by lora_bias)


@dataclass(frozen=True)
class LoraConversion:
    """What :func:`to_lora` returns: the new model (one LoRA adapter, the original's name),
    its spec, and the per-layer ranks and errors."""

    model: nn.Module
    spec: Spec
    layers: tuple[LayerConversion, ...]

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    def table(self) -> str:
        """The per-layer report, one line per layer (the CLI prints it)."""
        width = max((len(layer.path) for layer in self.layers), default=5)
        lines = [f"{'layer':<{width}}  rank  of  rel. error"]
        for layer in self.layers:
            note = " (+bias)" if layer.bias else ""
            lines.append(
                f"{layer.path:<{width}}  {layer.rank:>4}  {layer.full_rank:>3}  "
                f"{layer.error:.3e}{note}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Factors:
    path: str
    kind: str
    a: torch.Tensor  # the LoRA file's lora_A (or lora_embedding_A), in the layer's dtype
    b: torch.Tensor
    bias: torch.Tensor | None  # Δb, when the bias changed
    layer: LayerConversion


@torch.no_grad()
def to_lora(
    model: nn.Module,
    base: nn.Module,
    *,
    rank: int | None = None,
    max_error: float | None = None,
    adapter: str | None = None,
) -> LoraConversion:
    """The adapter ``adapter`` (default: the first active one) of the compiled ``model``
    as a LoRA adapter compiled onto ``base``, the model ``model`` was compiled from (which
    adaptc left untouched). Give ``rank``, ``max_error`` or both; ``model`` and ``base``
    are not changed. ``adaptc.save_adapter(result.model, dir)`` writes a PEFT LoRA
    directory that vLLM, TGI or peft read."""
    if rank is None and max_error is None:
        raise ToLoraError("to_lora(): give rank, max_error or both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ToLoraError(f"to_lora(): rank must be a positive integer, not {rank!r}")
    if max_error is not None and not 0.0 <= max_error < 1.0:
        raise ToLoraError(f"to_lora(): max_error must be in [0, 1), not {max_error!r}")
    info = compiled(model, "to_lora()")
    name = adapter if adapter is not None else (info.active[0] if info.active else None)
    if name is None or name not in info.spec.adapters:
        known = ", ".join(info.spec.adapters)
        raise ToLoraError(f"to_lora(): no adapter {name!r} in the model (it has: {known})")
    settings = info.spec.adapters[name]
    _check_convertible(settings, name)
    factors = list(_factored(model, name, settings, rank=rank, max_error=max_error))
    kept = [f for f in factors if f.layer.rank > 0]
    if not kept:
        raise ToLoraError(
            f"to_lora(): adapter {name!r} changes no layer (every update is zero); nothing "
            "to convert"
        )
    spec = _lora_spec(info.spec, name, settings, kept)
    if compiled_info(base) is not None:
        raise ToLoraError(
            "to_lora(): base is a compiled model; pass the model the adapter was compiled onto"
        )
    new = compile(base, spec)
    _load_factors(new, name, kept)
    _copy_saved_modules(model, new, name)
    return LoraConversion(new, spec, tuple(f.layer for f in factors))


def _check_convertible(settings: Any, name: str) -> None:
    method = settings.method
    if method == "trainable_tokens" or getattr(settings, "trainable_token_indices", None):
        raise ToLoraError(
            f"to_lora(): adapter {name!r} trains token rows (trainable tokens), which LoRA "
            "cannot carry"
        )
    if getattr(settings, "target_parameters", None):
        raise ToLoraError(
            f"to_lora(): adapter {name!r} targets parameters ({settings.target_parameters[0]}); "
            "converting fused expert stacks is not supported"
        )
    bias = getattr(settings, "bias", "none")
    if bias != "none":
        raise ToLoraError(
            f"to_lora(): adapter {name!r} trains base biases (bias: {bias}); not supported, as "
            "in peft's convert_to_lora"
        )


def _factored(
    model: nn.Module, name: str, settings: Any, *, rank: int | None, max_error: float | None
) -> Iterator[_Factors]:
    fan_in_fan_out = bool(getattr(settings, "fan_in_fan_out", False))
    for path, layer in target_layers(model):
        branches = branches_of(layer, [name])
        if not branches or any(b.tied_to is not None for b in branches):
            continue  # a tied head follows its embedding's branch: compiled as a companion
        kind = kind_of(layer, path)
        if kind.name not in (*_MATRIX, *_CONV, "nn.Embedding") and not kind.quantized:
            raise ToLoraError(f"{path}: converting {kind.name} layers to LoRA is not supported")
        if kind.name in _CONV and int(getattr(layer, "groups", 1)) != 1:
            raise ToLoraError(f"{path}: converting a grouped convolution to LoRA is not supported")
        weight = kind.weight(layer)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        w = weight.detach().float()
        bias = getattr(layer, "bias", None)
        b = None if bias is None else bias.detach().float()
        new_w, new_b = w, b
        for branch in branches:
            new_w, new_b = method_of(branch).merge(kind, layer, branch, new_w, new_b)
        delta = (new_w.float() - w).detach()
        delta_bias = None
        if b is not None and new_b is not None and not torch.equal(new_b.float(), b):
            delta_bias = (new_b.float() - b).to(dtype)
        yield _factor(path, kind.name, delta, delta_bias, dtype, rank, max_error,
                      transposed=kind.transposed(layer, fan_in_fan_out))  # fmt: skip


def _factor(
    path: str,
    kind: str,
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    dtype: torch.dtype,
    rank: int | None,
    max_error: float | None,
    *,
    transposed: bool,
) -> _Factors:
    if kind == "nn.Embedding":
        matrix = delta.T  # (dim, num): ΔW = (B·A)ᵀ
    elif kind in _CONV:
        matrix = delta.reshape(delta.shape[0], -1)  # (out, in·kernel)
    else:
        matrix = delta  # (out, in), or (in, out) for a transposed layout (peft's order)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = _rank(s, rank, max_error)
    energy = s.double().pow(2)
    total = float(energy.sum())
    error = math.sqrt(float(energy[k:].sum()) / total) if total > 0 else 0.0
    full = int((s > s.max() * max(matrix.shape) * torch.finfo(s.dtype).eps).sum()) if total else 0
    lora_b = u[:, :k] * s[:k]
    lora_a = vh[:k]
    if kind in _CONV:
        lora_a = lora_a.reshape(k, *delta.shape[1:])
        lora_b = lora_b.reshape(*lora_b.shape, *([1] * (delta.dim() - 2)))
    elif transposed and kind != "nn.Embedding":
        lora_a, lora_b = lora_b.T, lora_a.T  # (k, in), (out, k)
    layer = LayerConversion(path, k, full, error, delta_bias is not None)
    return _Factors(path, kind, lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous(),
                    delta_bias, layer)  # fmt: skip


def _rank(s: torch.Tensor, rank: int | None, max_error: float | None) -> int:
    """The truncation rank: ``rank``, or the smallest within ``max_error`` (capped by
    ``rank``); 0 for a zero update."""
    n = int(s.numel())
    energy = s.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 0
    if max_error is None:
        assert rank is not None
        return min(rank, n)
    # tail[k] = Σ_{i≥k} sᵢ²: the squared error when k values are kept
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    within = (tail <= (max_error**2) * total).nonzero()
    k = max(1, int(within[0]))
    return min(k, rank) if rank is not None else k


def _lora_spec(source: Spec, name: str, settings: Any, factors: list[_Factors]) -> Spec:
    ranks = [f.layer.rank for f in factors]
    common = max(set(ranks), key=ranks.count)
    pattern = {f.path: f.layer.rank for f in factors if f.layer.rank != common}
    adapter: dict[str, Any] = {
        "method": "lora",
        "targets": {"kind": "names", "names": [f.path for f in factors]},
        "r": common,
        "lora_alpha": common,
        "lora_bias": any(f.bias is not None for f in factors),
    }
    if pattern:
        adapter["rank_pattern"] = pattern
        adapter["alpha_pattern"] = dict(pattern)
    if getattr(settings, "fan_in_fan_out", False):
        adapter["fan_in_fan_out"] = True
    saved = getattr(settings, "modules_to_save", ())
    if saved:
        adapter["modules_to_save"] = list(saved)
    data = source.model_dump(mode="json", exclude_none=True)
    out: dict[str, Any] = {"version": 1, "adapters": {name: adapter}}
    for key in ("base_model", "task_type"):
        if data.get(key) is not None:
            out[key] = data[key]
    return load_spec(out)


def _load_factors(model: nn.Module, name: str, factors: list[_Factors]) -> None:
    layers = dict(target_layers(model))
    for f in factors:
        (branch,) = branches_of(layers[f.path], [name])
        a, b = _factor_tensors(branch, embedding=f.kind == "nn.Embedding")
        a.copy_(f.a.to(a.dtype))
        b.copy_(f.b.to(b.dtype))
        lora_b_bias = getattr(getattr(branch, "lora_B", None), "bias", None)
        if lora_b_bias is not None:
            lora_b_bias.copy_(f.bias if f.bias is not None else torch.zeros_like(lora_b_bias))


def _factor_tensors(branch: nn.Module, *, embedding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    found = []
    for name in names:
        value = getattr(branch, name)
        tensor = value if isinstance(value, torch.Tensor) else getattr(value, "weight", None)
        assert isinstance(tensor, torch.Tensor), name
        found.append(tensor)
    return found[0], found[1]


def _copy_saved_modules(source: nn.Module, new: nn.Module, name: str) -> None:
    mine = dict(saved_modules(new))
    for path, wrapper in saved_modules(source):
        if name in wrapper.modules_to_save and path in mine:
            state = wrapper.modules_to_save[name].state_dict()
            mine[path].modules_to_save[name].load_state_dict(state)
