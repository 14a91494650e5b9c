"""bitsandbytes' layers: ``Linear8bitLt`` (int8) and ``Linear4bit`` (nf4/fp4, QLoRA).

Matched by class name and module, so adaptc never imports bitsandbytes unless a model
holds its layers. The compiled model's copies share the quantized weights and keep their
quantization state; for a merge a weight is dequantized and the merged layer is a plain
float ``nn.Linear``.

- ``Linear8bitLt``: a new ``Int8Params`` over the same storage, its ``CB``/``SCB`` kept,
  and its own matmul ``state``: the layer's forward moves ``CB``/``SCB`` into it, which
  must not touch the user's layer. Dequantized: ``CB · SCB / 127`` (float32).
- ``Linear4bit``: a new ``Params4bit`` over the same packed bytes with its own copy of the
  ``QuantState`` (same tensors). On CPUs with AVX-512-BF16, bitsandbytes repacks a layer's
  weight in place at its first eval-mode forward on an input without grad (for a bf16
  inference kernel): the bytes are reordered, the block scales rounded to bfloat16 and
  transposed, double quantization undone. A repacked layer then has no gradient to its
  input, computes in bfloat16 whatever its compute dtype, fails when ``in_features < 64``,
  and bitsandbytes' own undo (run by ``state_dict()``) leaves the scales transposed when
  double quantization is off. adaptc's copies never repack (their
  ``support_avx512bf16_for_cpu`` is off), so the user's later eval forwards leave them as
  they are; a weight the user's model has already repacked is unpacked correctly into
  the copy (the bytes exactly; the scales as bfloat16 kept them), with a warning.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptc.layers.base import share_parameter
from adaptc.layers.quantized import QuantizedLinearKind

__all__ = ["Bnb4bitKind", "Bnb8bitKind", "dequantize_4bit", "is_bnb", "unpack_cpu_4bit"]


def is_bnb(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is bitsandbytes' layer class ``name`` or a subclass of it (such as
    ``LinearNF4``), without importing bitsandbytes."""
    return any(
        cls.__name__ == name and cls.__module__.startswith("bitsandbytes")
        for cls in type(module).__mro__
    )


@dataclass(frozen=True)
class Bnb8bitKind(QuantizedLinearKind):
    name: str = "bnb.Linear8bitLt"
    layer_type: type[nn.Module] = nn.Linear  # a subclass of nn.Linear; matched by name

    def matches(self, module: nn.Module) -> bool:
        return is_bnb(module, "Linear8bitLt")

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the layer reads for a merge; its output follows its input's dtype."""
        return torch.float32

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight (float32), as PEFT's ``dequantize_bnb_weight``."""
        import bitsandbytes as bnb

        weight: Any = module.weight
        state: Any = getattr(module, "state", None)
        scb = getattr(state, "SCB", None)
        if scb is None:
            scb = getattr(weight, "SCB", None)
        if weight.device.type == "meta" or scb is None:  # planning: shapes only
            return torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        scale = scb.to(weight.device)
        out: torch.Tensor = bnb.functional.int8_vectorwise_dequant(weight.data, scale)
        return out

    def share_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        if name != "weight" or type(param).__name__ != "Int8Params":
            return share_parameter(param)
        cls: Any = type(param)
        return cls(  # type: ignore[no-any-return]
            param.data, requires_grad=False, has_fp16_weights=param.has_fp16_weights,  # type: ignore[attr-defined]
            CB=param.CB, SCB=param.SCB,  # type: ignore[attr-defined]
        )  # fmt: skip

    def share_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        if "state" in state:
            state["state"] = copy.copy(state["state"])  # the same tensors, its own fields

    def requantize(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[nn.Module, float]:
        """A ``Linear8bitLt`` holding ``weight`` quantized as bitsandbytes does when it loads
        one (from float16, row-wise absmax), with a fresh matmul state."""
        import bitsandbytes as bnb

        cls: Any = type(module.weight)
        param: Any = cls(
            weight.detach().to(torch.float16), requires_grad=False, has_fp16_weights=False
        )._quantize(weight.device)
        new = _requantized(module, param, bias)
        state: Any = copy.copy(module.state)
        state.CB = state.SCB = None  # the new weight carries them until its first forward
        new.__dict__["state"] = state
        error = (bnb.functional.int8_vectorwise_dequant(param.CB, param.SCB) - weight).abs()
        return new, float(error.max())


def _requantized(module: nn.Module, weight: nn.Parameter, bias: torch.Tensor | None) -> nn.Module:
    """A shallow copy of the quantized ``module`` with the new ``weight`` (and ``bias``)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._parameters["weight"] = weight
    if bias is not None and new._parameters.get("bias") is not None:
        new._parameters["bias"] = nn.Parameter(bias.detach(), requires_grad=False)
    new._modules = dict(module._modules)
    return new


def _packed(quant_state: Any) -> bool:
    """Whether bitsandbytes has repacked the weight for its AVX-512-BF16 CPU kernel."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def unpack_cpu_4bit(data: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """New (bytes, ``QuantState``) in bitsandbytes' standard 4-bit layout for a weight its
    CPU kernel repacked; ``data`` and ``quant_state`` are left as they are.

    The bytes come back exactly. The block scales were rounded to bfloat16 and stored
    transposed, (K/blocksize, N): they come back in their flat (N·K/blocksize,) order, as
    float32, without double quantization (requantizing them would round them twice)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state: Any = copy.copy(quant_state)
    qweight, state = _convert_weight_packed_for_cpu_inverse(data, state)
    absmax = quant_state.absmax  # (K/blocksize, N), bfloat16: the packed layout
    state.absmax = absmax.T.reshape(-1).float().contiguous()  # scales are float32
    state.nested = False
    state.offset = None
    state.state2 = None
    state.dtype = quant_state.original_dtype
    state.packing_format_for_cpu = False
    return qweight, state


def dequantize_4bit(weight: torch.Tensor) -> torch.Tensor:
    """The dequantized weight of a ``Params4bit`` (its quantization state's dtype), as
    PEFT's ``dequantize_bnb_weight``; a graph calls it where DoRA reads the base weight."""
    import bitsandbytes as bnb

    state: Any = getattr(weight, "quant_state", None)
    if weight.device.type == "meta" or state is None:  # planning: shapes only
        shape = state.shape if state is not None else weight.shape
        dtype = state.dtype if state is not None else torch.float32
        return torch.empty(shape, dtype=dtype, device=weight.device)
    data = weight.data
    if _packed(state):  # a user's layer repacked by its own eval forward
        data, state = unpack_cpu_4bit(data, state)
    out: torch.Tensor = bnb.functional.dequantize_4bit(data, state)
    return out


@dataclass(frozen=True)
class Bnb4bitKind(QuantizedLinearKind):
    name: str = "bnb.Linear4bit"
    layer_type: type[nn.Module] = nn.Linear  # a subclass of nn.Linear; matched by name

    def matches(self, module: nn.Module) -> bool:
        return is_bnb(module, "Linear4bit")

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of the dequantized weight (the model's dtype when it was quantized);
        the layer's output follows its input's dtype."""
        state: Any = getattr(module.weight, "quant_state", None)
        return torch.float32 if state is None else state.dtype

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight, as PEFT's ``dequantize_bnb_weight``."""
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return dequantize_4bit(weight)

    def share_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        if name != "weight" or type(param).__name__ != "Params4bit":
            return share_parameter(param)
        p: Any = param
        data, state = param.data, copy.copy(p.quant_state)  # its own state, same tensors
        if _packed(state):
            warnings.warn(
                "bitsandbytes has repacked 4-bit weights of this model for its AVX-512-BF16 "
                "CPU kernel (an eval-mode forward without grad), rounding their block scales to "
                "bfloat16; the compiled model holds unpacked copies of them. Compile before "
                "running the base in eval mode to share the weights as loaded.",
                stacklevel=2,
            )
            data, state = unpack_cpu_4bit(data, p.quant_state)
        cls: Any = type(param)
        return cls(  # type: ignore[no-any-return]
            data, requires_grad=False, quant_state=state, blocksize=p.blocksize,
            compress_statistics=p.compress_statistics, quant_type=p.quant_type,
            quant_storage=p.quant_storage, module=None, bnb_quantized=True,
        )  # fmt: skip

    def share_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        state["support_avx512bf16_for_cpu"] = False  # never repack the shared bytes
        weight = state["_parameters"].get("weight")
        if weight is not None and hasattr(weight, "quant_state"):
            state["quant_state"] = weight.quant_state

    def requantize(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[nn.Module, float]:
        """A ``Linear4bit`` holding ``weight`` quantized in the layer's format (quant type,
        block size, double quantization, storage), from the dtype it was quantized in."""
        from bitsandbytes import functional

        p: Any = module.weight
        state: Any = p.quant_state
        param: Any = type(p)(
            weight.detach().to(state.dtype).contiguous(), requires_grad=False,
            blocksize=p.blocksize, compress_statistics=p.compress_statistics,
            quant_type=p.quant_type, quant_storage=p.quant_storage,
        )._quantize(weight.device)  # fmt: skip
        new = _requantized(module, param, bias)
        new.__dict__["quant_state"] = param.quant_state
        avx512bf16: Any = functional.has_avx512bf16  # untyped
        new.__dict__["support_avx512bf16_for_cpu"] = avx512bf16()  # a model of its own
        error = (dequantize_4bit(param) - weight).abs()
        return new, float(error.max())
