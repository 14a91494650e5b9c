"""A base model loaded quantized, as ``base_model.quantization`` declares, and what it weighs.

:func:`from_pretrained_kwargs` gives the keywords transformers' ``from_pretrained`` takes
for a backend it quantizes while loading (bitsandbytes: ``BitsAndBytesConfig``);
:func:`quantize_loaded` quantizes a loaded float model in place for the others (torchao's
``quantize_``, hqq's ``AutoHQQHFModel.quantize_model``, optimum-quanto's ``quantize`` and
``freeze``), as their documentation shows. Every backend quantizes the ``nn.Linear``
layers but the output head (transformers' rule) and the ``skip_modules`` a spec names.

:func:`quantized_bytes` estimates the memory of a model's weights once quantized from its
meta-device twin (a plan reads no weight): each quantized layer's codes plus its scales
(and zero points), everything else at the model's dtype.

>>> q = BitsAndBytesQuantization(method="bitsandbytes", bits=4)     # doctest: +SKIP
>>> kwargs = from_pretrained_kwargs(q)                              # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained(path, **kwargs)    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptc.dtypes import DTYPES
from adaptc.layers import kind_of
from adaptc.spec.quantization import (
    BitsAndBytesQuantization,
    HqqQuantization,
    QuantoQuantization,
    TorchaoQuantization,
)

__all__ = [
    "QuantizationError",
    "bits_per_weight",
    "describe",
    "from_pretrained_kwargs",
    "quantize_loaded",
    "quantized_bytes",
    "quantized_layers",
    "roundtrip",
]

_PACKAGES = {
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "hqq": "hqq",
    "quanto": "optimum.quanto",
}


class QuantizationError(ValueError):
    """The base cannot be quantized as declared (a backend missing, a setting it refuses)."""


def describe(q: Any) -> str:
    """``bitsandbytes 4-bit nf4, double quant`` and the like, for messages and tables."""
    if isinstance(q, BitsAndBytesQuantization):
        if q.bits == 8:
            return "bitsandbytes 8-bit"
        double = ", double quant" if q.double_quant else ""
        return f"bitsandbytes 4-bit {q.quant_type or 'fp4'}{double}"
    if isinstance(q, TorchaoQuantization):
        group = f", group {q.group_size or 32}" if q.scheme == "int4_weight_only" else ""
        return f"torchao {q.scheme}{group}"
    if isinstance(q, HqqQuantization):
        return f"hqq {q.bits}-bit, group {q.group_size}"
    assert isinstance(q, QuantoQuantization)
    return f"quanto {q.weights}"


def _require(q: Any) -> None:
    import importlib.util

    package = _PACKAGES[q.method]
    try:
        found = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # optimum itself is missing
        found = False
    if not found:
        raise QuantizationError(
            f"base_model.quantization: method {q.method!r} needs the package {package} "
            '(pip install "adaptc[quant]")'
        )


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def from_pretrained_kwargs(q: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords for a backend transformers quantizes while loading
    (``quantization_config``, ``device_map``); empty for the others."""
    if not isinstance(q, BitsAndBytesQuantization):
        return {}
    _require(q)
    import transformers

    config_class: Any = transformers.BitsAndBytesConfig  # untyped
    skip = list(q.skip_modules) or None
    if q.bits == 8:
        config = config_class(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = config_class(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type or "fp4",
            bnb_4bit_use_double_quant=bool(q.double_quant),
            bnb_4bit_compute_dtype=DTYPES[q.compute_dtype or "fp32"],
            llm_int8_skip_modules=skip,
        )
    return {"quantization_config": config, "device_map": {"": _device()}}


def quantized_layers(model: nn.Module, q: Any) -> list[str]:
    """The paths of the layers a backend quantizes: every ``nn.Linear`` but the output
    head (the module holding the output embeddings) and the ``skip_modules``."""
    head = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
    skip = tuple(getattr(q, "skip_modules", ()))
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and not any(path == s or path.endswith(f".{s}") for s in skip)
    ]


def quantize_loaded(model: nn.Module, q: Any) -> nn.Module:
    """Quantize a loaded float ``model`` in place for a backend transformers does not
    quantize while loading (torchao, hqq, quanto); return it. bitsandbytes: unchanged."""
    if isinstance(q, BitsAndBytesQuantization):
        return model
    _require(q)
    layers = set(quantized_layers(model, q))
    if isinstance(q, TorchaoQuantization):
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        group = PerGroup(q.group_size or 32)
        config: Any = (
            Int8WeightOnlyConfig()
            if q.scheme == "int8_weight_only"
            else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=group)  # type: ignore[attr-defined]
        )
        quantize_(model, config, filter_fn=lambda _, path: path in layers)
    elif isinstance(q, HqqQuantization):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        dtype = next(model.parameters()).dtype
        config = BaseQuantizeConfig(nbits=q.bits, group_size=q.group_size)
        for path in layers:
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent)
            linear = owner.get_submodule(name)
            layer = HQQLinear(linear, quant_config=config, compute_dtype=dtype, device=_device())
            setattr(owner, name, layer)
    else:
        from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

        weights = {"int8": qint8, "int4": qint4, "int2": qint2, "float8": qfloat8}[q.weights]
        others = [
            p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p not in layers
        ]
        quantize(model, weights=weights, exclude=others or None)
        freeze(model)
    return model


def bits_per_weight(q: Any, in_features: int, dtype_bytes: int) -> float:
    """Bits a quantized layer stores per weight: its codes plus its scales (and zero
    points), for rows of ``in_features`` and scales at ``dtype_bytes`` where the backend
    keeps them in the model's dtype. bitsandbytes 4-bit: one fp32 absmax per 64 weights,
    or with double quant an int8 one and an fp32 per 256 of those; 8-bit: one fp32 scale
    per row. torchao int8: one scale per row; int4: a scale and a zero point per group.
    hqq: a scale and a zero point per group. quanto: one scale per row (int8, float8) or a
    scale and a shift per group of 128 (int4, int2)."""
    if isinstance(q, BitsAndBytesQuantization):
        if q.bits == 8:
            return 8 + 32 / in_features
        return 4 + (8 / 64 + 32 / (64 * 256) if q.double_quant else 32 / 64)
    if isinstance(q, TorchaoQuantization):
        if q.scheme == "int8_weight_only":
            return 8 + 8 * dtype_bytes / in_features
        return 4 + 2 * 8 * dtype_bytes / (q.group_size or 32)
    if isinstance(q, HqqQuantization):
        return q.bits + 2 * 8 * dtype_bytes / q.group_size
    assert isinstance(q, QuantoQuantization)
    if q.weights in ("int8", "float8"):
        return 8 + 8 * dtype_bytes / in_features
    return {"int4": 4, "int2": 2}[q.weights] + 2 * 8 * dtype_bytes / 128


def quantized_bytes(model: nn.Module, q: Any, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s weights once quantized by ``q`` (``model`` may live on the meta
    device): the quantized layers' weights at :func:`bits_per_weight`, every other tensor
    (embeddings, norms, the head, biases) at ``dtype``. Tied tensors count once."""
    size = dtype.itemsize
    quantized = {id(model.get_submodule(p).weight): p for p in quantized_layers(model, q)}
    total = 0.0
    for p in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        if id(p) in quantized:
            rows, columns = p.shape
            total += rows * columns * bits_per_weight(q, int(columns), size) / 8
        elif p.is_floating_point():
            total += p.numel() * size
        else:
            total += p.numel() * p.element_size()
    return int(total)


@torch.no_grad()
def roundtrip(weight: torch.Tensor, q: Any) -> torch.Tensor:
    """``weight`` (a linear layer's, (out, in)) quantized by ``q`` as loading a checkpoint
    quantizes it, then dequantized: the weight a quantized base computes with, in
    ``weight``'s dtype. A merged checkpoint of a quantized base holds these."""
    _require(q)
    if isinstance(q, BitsAndBytesQuantization):
        import bitsandbytes as bnb

        if q.bits == 8:  # Int8Params: row-wise absmax of the float16 weight
            codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
            out = bnb.functional.int8_vectorwise_dequant(codes, scales)
        else:  # Params4bit: blocks of 64
            codes, state = bnb.functional.quantize_4bit(
                weight.contiguous(), blocksize=64, compress_statistics=bool(q.double_quant),
                quant_type=q.quant_type or "fp4",
            )  # fmt: skip
            out = bnb.functional.dequantize_4bit(codes, state)
        result: torch.Tensor = out.to(weight.dtype)
        return result
    holder = nn.Module()
    holder.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    holder.layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    quantize_loaded(holder, q)
    layer: Any = holder.layer
    dequantized: torch.Tensor = kind_of(layer).weight(layer).to(weight.dtype)
    return dequantized
