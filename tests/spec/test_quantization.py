"""``base_model.quantization``: a tagged union per backend, validated with located errors."""

from __future__ import annotations

import pytest

import adaptc
from adaptc.spec import SpecError
from adaptc.spec.quantization import BitsAndBytesQuantization, TorchaoQuantization

HEAD = """\
version: 1
base_model:
  name: org/llama
  quantization:
"""
TAIL = """\
adapters:
  default:
    targets: {kind: all-linear}
"""


def spec_text(quantization: str) -> str:
    return HEAD + "".join(f"    {line}\n" for line in quantization.splitlines()) + TAIL


@pytest.mark.parametrize(
    ("quantization", "kind", "fields"),
    [
        ("method: bitsandbytes\nbits: 4\nquant_type: nf4\ndouble_quant: true\ncompute_dtype: bf16",
         BitsAndBytesQuantization, {"bits": 4, "quant_type": "nf4", "double_quant": True}),
        ("method: bitsandbytes\nbits: 8", BitsAndBytesQuantization,
         {"bits": 8, "merge": "dequantize"}),
        ("method: torchao\nscheme: int4_weight_only\ngroup_size: 64", TorchaoQuantization,
         {"group_size": 64}),
        ("method: torchao\nscheme: int8_weight_only\nmerge: requantize", TorchaoQuantization,
         {"merge": "requantize"}),
    ],
)  # fmt: skip
def test_valid_quantizations(tmp_path, quantization, kind, fields):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(quantization))
    q = adaptc.load_spec(path).base_model.quantization
    assert isinstance(q, kind)
    assert {k: getattr(q, k) for k in fields} == fields


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ("method: bitsandbytes\nbits: 8\nquant_type: nf4",
         "7:17: base_model.quantization.quant_type: quant_type applies to 4-bit layers only"),
        ("method: bitsandbyts\nbits: 4",
         "5:5: base_model.quantization: unknown quantization method 'bitsandbyts'; expected one "
         "of: bitsandbytes, torchao, hqq, quanto; did you mean 'bitsandbytes'?"),
        ("method: bitsandbytes\nbits: 3",
         "6:11: base_model.quantization.bits: expected 4 or 8, got integer 3"),
        ("method: torchao\nscheme: int8_weight_only\ngroup_size: 32",
         "base_model.quantization.group_size: group_size applies to int4_weight_only only"),
        ("method: hqq\nbits: 4\ngroupsize: 64",
         "7:5: base_model.quantization.groupsize: unknown field"),
        ("method: quanto\nweights: int8\nmerge: requant",
         "7:12: base_model.quantization.merge: expected 'dequantize' or 'requantize', got "
         "string 'requant'; did you mean 'requantize'?"),
    ],
)  # fmt: skip
def test_bad_quantizations_are_located(tmp_path, quantization, message):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(quantization))
    with pytest.raises(SpecError) as info:
        adaptc.load_spec(path)
    assert message in str(info.value)


def test_the_schema_has_the_union_and_docs_describe_it():
    schema = adaptc.spec.json_schema()
    union = schema["$defs"]["BaseModelRef"]["properties"]["quantization"]
    tags = union["anyOf"][0]["discriminator"]["mapping"]
    assert sorted(tags) == ["bitsandbytes", "hqq", "quanto", "torchao"]
    from adaptc.spec.docs import field_reference

    assert "### `base_model.quantization` with `method: bitsandbytes`" in field_reference()
