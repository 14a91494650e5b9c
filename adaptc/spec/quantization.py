"""``base_model.quantization``: how the base is loaded quantized (QLoRA), one model per
backend, chosen by ``method`` (a tagged union).

The spec says what a user would pass to transformers (``BitsAndBytesConfig``,
``TorchAoConfig``, ``QuantoConfig``) or to hqq; :mod:`adaptc.quantize` turns it into
that. Defaults are the backends' own, so a spec means what the same settings mean in
Python. ``merge`` and ``merge_dtype`` say what ``adaptc merge`` writes for a quantized
base: a float checkpoint of the dequantized weights plus the update (exact, what serving
engines read), or the merged weights quantized again in the base's format (lossy).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, StrictBool, model_validator

from adaptc.spec.fields import FieldError, closed

__all__ = [
    "DTYPE_NAMES",
    "BitsAndBytesQuantization",
    "HqqQuantization",
    "Quantization",
    "QuantoQuantization",
    "TorchaoQuantization",
]

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the CLI's --dtype names

_MERGE: Any = Field(
    default="dequantize",
    description="What `adaptc merge` writes: `dequantize` (a float checkpoint holding "
    "W_deq + s·ΔW, exact) or `requantize` (the merged weights quantized again in this "
    "format; lossy, the largest error per layer is reported).",
)
_MERGE_DTYPE: Any = Field(
    default=None,
    description="dtype of a dequantized merge (`fp32`, `bf16`, `fp16`; default: the base "
    "model's dtype).",
)
_MergeChoice = Literal["dequantize", "requantize"]
_Dtype = Literal[DTYPE_NAMES]  # type: ignore[valid-type]


class BitsAndBytesQuantization(BaseModel):
    """bitsandbytes: 4-bit (QLoRA's nf4/fp4) or 8-bit (LLM.int8) linear layers."""

    model_config = closed()
    method: Literal["bitsandbytes"] = Field(description="The backend: bitsandbytes.")
    bits: Literal[4, 8] = Field(description="4 (`Linear4bit`) or 8 (`Linear8bitLt`).")
    quant_type: Literal["nf4", "fp4"] | None = Field(
        default=None,
        description="4-bit data type (`bnb_4bit_quant_type`; default `fp4`, as "
        "transformers'; QLoRA uses `nf4`).",
    )
    double_quant: StrictBool | None = Field(
        default=None,
        description="Quantize the 4-bit block scales too (`bnb_4bit_use_double_quant`; "
        "default false).",
    )
    compute_dtype: _Dtype | None = Field(
        default=None, description="dtype 4-bit layers compute in (`bnb_4bit_compute_dtype`; "
        "default fp32)."
    )  # fmt: skip
    skip_modules: tuple[str, ...] = Field(
        default=(),
        description="Modules left in float (`llm_int8_skip_modules`; transformers always "
        "keeps the output head).",
    )
    merge: _MergeChoice = _MERGE
    merge_dtype: _Dtype | None = _MERGE_DTYPE

    @model_validator(mode="after")
    def _four_bit_fields(self) -> BitsAndBytesQuantization:
        if self.bits == 8:
            for name in ("quant_type", "double_quant", "compute_dtype"):
                if getattr(self, name) is not None:
                    raise FieldError((name,), f"{name} applies to 4-bit layers only (bits: 4)")
        return self


class TorchaoQuantization(BaseModel):
    """torchao weight-only quantization (``TorchAoConfig``)."""

    model_config = closed()
    method: Literal["torchao"] = Field(description="The backend: torchao.")
    scheme: Literal["int8_weight_only", "int4_weight_only"] = Field(
        description="`int8_weight_only` (`Int8WeightOnlyConfig`) or `int4_weight_only` "
        "(`IntxWeightOnlyConfig` with int4 and per-group scales)."
    )
    group_size: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Values per scale for `int4_weight_only` (default 32)."
    )
    merge: _MergeChoice = _MERGE
    merge_dtype: _Dtype | None = _MERGE_DTYPE

    @model_validator(mode="after")
    def _group_size(self) -> TorchaoQuantization:
        if self.group_size is not None and self.scheme != "int4_weight_only":
            raise FieldError(("group_size",), "group_size applies to int4_weight_only only")
        return self


class HqqQuantization(BaseModel):
    """HQQ (half-quadratic quantization; hqq's ``BaseQuantizeConfig``)."""

    model_config = closed()
    method: Literal["hqq"] = Field(description="The backend: hqq.")
    bits: Literal[1, 2, 3, 4, 8] = Field(description="Bits per weight (`nbits`).")
    group_size: Annotated[int, Field(gt=0)] = Field(
        default=64, description="Values per scale and zero point."
    )
    merge: _MergeChoice = _MERGE
    merge_dtype: _Dtype | None = _MERGE_DTYPE


class QuantoQuantization(BaseModel):
    """optimum-quanto weight quantization (``QuantoConfig``)."""

    model_config = closed()
    method: Literal["quanto"] = Field(description="The backend: optimum-quanto.")
    weights: Literal["int8", "int4", "int2", "float8"] = Field(
        description="Weight data type (`QuantoConfig(weights=...)`)."
    )
    merge: _MergeChoice = _MERGE
    merge_dtype: _Dtype | None = _MERGE_DTYPE


Quantization = Annotated[
    Union[  # noqa: UP007 - pydantic's tagged union
        BitsAndBytesQuantization, TorchaoQuantization, HqqQuantization, QuantoQuantization
    ],
    Field(discriminator="method"),
]
