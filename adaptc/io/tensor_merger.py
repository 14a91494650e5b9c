"""Which tensors of a checkpoint an adapter changes, and their new values.

:class:`TensorMerger` compiles the adapter onto the checkpoint's model built on the meta
device, where its keys fit (the model itself, or its base model: peft's
``base_model.model.`` prefix rules), and derives one operation per checkpoint tensor it
changes: ``W + s·ΔW`` for an adapted weight (or a ``lora_bias``), the adapter's own tensor
for a ``modules_to_save`` copy or a trained bias. A layer's adapted weights are the ones
its kind writes back in a merge: ``weight`` for most, ``in_proj_weight`` and
``out_proj.weight`` for ``nn.MultiheadAttention``. It checks everything against the
checkpoint's safetensors headers before anything is written, then computes each new
tensor on its own (one weight in memory at a time: the layer's other weights are zeros,
which an additive update row by row does not read).
"""

from __future__ import annotations

import copy
import json
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptc.adapters.keys import PREFIX, adapter_branches, adapter_tensors, is_base_tensor
from adaptc.compiler import CompileError, compile, compiled_info
from adaptc.compiler.passes import merged_layer
from adaptc.dtypes import DTYPES as _SPEC_DTYPES
from adaptc.io.load import AdapterLoadError
from adaptc.layers import ParameterSlot, kind_of
from adaptc.methods.base import Branch
from adaptc.methods.registry import method
from adaptc.plan.plan import PlannedTarget
from adaptc.quantize import quantized_layers, roundtrip
from adaptc.spec import Spec

__all__ = ["DTYPES", "TensorMerger", "read_header"]


def read_header(path: Path) -> tuple[int, bytes, dict[str, Any]]:
    with path.open("rb") as fh:
        try:
            (size,) = struct.unpack("<Q", fh.read(8))
            raw = fh.read(size)
            header = json.loads(raw)
        except (struct.error, ValueError, MemoryError) as exc:
            raise AdapterLoadError(f"{path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterLoadError(f"{path} is not a readable safetensors file")
    return size, raw, header


DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Merge:
    """``W + s·ΔW`` for the ``attr`` (a dotted name: ``weight``, ``out_proj.weight``) of the
    target at ``path``; ``base`` is the adapter key of a trained bias that replaces the
    checkpoint's before the LoRA bias is added."""

    path: str
    attr: str
    base: str | None = None


@dataclass(frozen=True)
class _Dequantize:
    """A weight the quantized base computes with dequantized (``W_deq``), no update."""


@dataclass(frozen=True)
class _Copy:
    """The adapter's tensor under ``key`` (a saved module's copy, a trained bias)."""

    key: str


class TensorMerger:
    """The adapter compiled on the meta model: which checkpoint tensor changes, and how."""

    def __init__(
        self,
        meta: nn.Module,
        compiled: nn.Module,
        root: str,
        spec: Spec,
        adapter: str,
        tensors: dict[str, torch.Tensor],
        weights_path: Path,
    ) -> None:
        self.root, self.spec, self.adapter = root, spec, adapter
        self.tensors, self.weights_path = tensors, weights_path
        self.prefix = str(getattr(meta, "base_model_prefix", "") or "")
        self.model_keys = set(meta.state_dict(keep_vars=True))
        self.branches = {b.target: b for b in adapter_branches(compiled, adapter)}
        self.layers = {
            b.target: layer
            for layer in compiled.modules()
            for b in layer.children()
            if isinstance(b, Branch) and b.adapter == adapter
        }
        info = compiled_info(compiled)
        assert info is not None
        self.targets: dict[str, PlannedTarget] = {
            t.path: t for t in info.plan.targets if t.adapter == adapter
        }
        self.ops: dict[str, _Merge | _Copy | _Dequantize] = {}  # model key -> its new value
        lora = {f"{PREFIX}{b.file_path}.{n}" for b in self.branches.values() for n, _ in
                b.file_tensors()}  # fmt: skip
        for path, branch in self.branches.items():
            if isinstance(self.layers[path], ParameterSlot):  # refused: _check_mergeable
                continue
            if branch.tied_to is not None:  # a tied head: its weight is its source's, stored
                continue  # once (and its update is the source's)
            for attr in _merged_weights(self.layers[path]):
                self.ops[f"{root}{path}.{attr}"] = _Merge(path, attr)
            if getattr(branch, "lora_bias", False):
                self.ops[f"{root}{path}.bias"] = _Merge(path, "bias")
        for key in tensors:
            if key in lora or is_base_tensor(key):  # a targeted embedding's frozen weight
                continue
            model_key = root + key.removeprefix(PREFIX).replace(".base_layer.", ".")
            existing = self.ops.get(model_key)
            if isinstance(existing, _Merge):  # a trained bias under a LoRA bias
                self.ops[model_key] = _Merge(existing.path, existing.attr, base=key)
            else:
                self.ops[model_key] = _Copy(key)
        # a quantized base: the checkpoint holds W_deq for every layer it quantizes, so the
        # merged model computes what the adapter was trained on
        self.quantization = spec.quantization
        self.quantized: set[str] = set()
        if self.quantization is not None:
            self.quantized = {f"{p}.weight" for p in quantized_layers(meta, self.quantization)}
            for key in self.quantized:
                self.ops.setdefault(key, _Dequantize())
        self.by_checkpoint_key: dict[str, str] = {}
        self.headers: dict[str, tuple[int, bytes, dict[str, Any]]] = {}  # shard -> header
        self.merged = self.replaced = self.dequantized = 0

    @classmethod
    def fit(
        cls,
        meta: nn.Module,
        spec: Spec,
        adapter: str,
        tensors: dict[str, torch.Tensor],
        weights_path: Path,
    ) -> TensorMerger:
        """Compile the adapter onto ``meta`` (or its base model) where its keys fit."""
        name = f"adapter {adapter!r} ({weights_path})"
        misfits: list[tuple[int, str]] = []
        errors: list[str] = []
        for root_module, root, strip in _roots(meta):
            keys = tensors
            if strip is not None:
                if not all(k.startswith(strip) for k in tensors):
                    continue
                keys = {PREFIX + k.removeprefix(strip): v for k, v in tensors.items()}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    compiled = compile(root_module, spec)
            except (CompileError, ValueError) as exc:
                errors.append(str(exc).splitlines()[0])
                continue
            expected = {k for k, _ in adapter_tensors(compiled, adapter)}
            missing, extra = sorted(expected - set(keys)), sorted(set(keys) - expected)
            if not missing and not extra:
                merger = cls(meta, compiled, root, spec, adapter, keys, weights_path)
                merger._check_mergeable(name)
                return merger
            problem = (f"{len(missing)} missing (e.g. {missing[0]})" if missing
                       else f"{len(extra)} unexpected (e.g. {extra[0]})")  # fmt: skip
            misfits.append((len(missing) + len(extra), f"tensors {problem}"))
        model = type(meta).__name__
        if misfits:
            raise AdapterLoadError(
                f"the {name} does not fit this model ({model}): {min(misfits)[1]}"
            )
        raise AdapterLoadError(
            f"the {name} does not fit this model ({model}): {errors[0] if errors else '?'}"
        )

    def _check_mergeable(self, name: str) -> None:
        q = self.quantization
        if q is not None and q.merge == "requantize":
            raise AdapterLoadError(
                f"{name}: its spec asks for a requantized merge (base_model.quantization.merge),"
                " which a streamed float checkpoint cannot hold; merge it in memory "
                "(merge_in_memory, as `adaptc merge` does) or set merge: dequantize"
            )
        for path, branch in self.branches.items():
            if isinstance(self.layers[path], ParameterSlot):
                raise AdapterLoadError(
                    f"{name}: it targets the parameter {self.root}{path}, which a checkpoint "
                    "keeps in another form (transformers converts fused experts when loading "
                    "and saving); merge it in memory (merge_in_memory, as `adaptc merge` does)"
                )
            if (
                getattr(branch, "lora_bias", False)
                and getattr(self.layers[path], "bias", None) is None
            ):
                raise AdapterLoadError(
                    f"{name}: {self.root}{path} has lora_bias but the layer has no bias, so "
                    "the update cannot be merged into the checkpoint (peft refuses it too)"
                )

    def check_checkpoint(self, source: Path, shards: list[str]) -> None:
        """Every tensor the merge replaces is in the checkpoint, with the adapter's shape
        (the headers read here are kept in ``headers``, for writing)."""
        for shard in shards:
            self.headers[shard] = read_header(source / shard)
            header = self.headers[shard][2]
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                model_key = self._model_key(key)
                op = self.ops.get(model_key)
                if op is None:
                    continue
                if str(entry["dtype"]) not in DTYPES or (
                    isinstance(op, (_Merge, _Dequantize)) and str(entry["dtype"]) not in _FLOATS
                ):
                    raise AdapterLoadError(
                        f"{source / shard}: {key} has dtype {entry['dtype']}, which the merge "
                        "cannot change"
                    )
                if isinstance(op, _Copy):
                    want = tuple(self.tensors[op.key].shape)
                    have = tuple(entry["shape"])
                    if want != have:
                        raise AdapterLoadError(
                            f"the adapter's {op.key} has shape {want}, the checkpoint's {key} "
                            f"{have} ({source / shard})"
                        )
                self.by_checkpoint_key[key] = model_key
        absent = sorted(set(self.ops) - set(self.by_checkpoint_key.values()))
        if absent:
            op = self.ops[absent[0]]
            what = (
                "an adapted weight" if isinstance(op, _Merge)
                else "a quantized weight" if isinstance(op, _Dequantize)
                else f"the adapter's {op.key}"
            )  # fmt: skip
            raise AdapterLoadError(
                f"the checkpoint {source} holds no tensor {absent[0]} ({what}; a tied or "
                f"missing weight?): {len(absent)} such tensor(s), nothing written"
            )

    def wants(self, key: str) -> bool:
        """Whether the checkpoint tensor ``key`` changes."""
        return key in self.by_checkpoint_key

    def tensor(
        self, key: str, tensor: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The new value of the checkpoint tensor ``key`` (its shape; its dtype, or
        ``dtype``: a quantized weight is dequantized in the checkpoint's dtype, as loading
        quantizes it; the update is added in the wider of the two, rounded once to ``dtype``)."""
        dtype = dtype or tensor.dtype
        model_key = self.by_checkpoint_key[key]
        op = self.ops[model_key]
        if isinstance(op, _Copy):
            self.replaced += 1
            return self.tensors[op.key].detach().to(dtype).contiguous()
        if model_key in self.quantized:  # what the quantized base computes with
            tensor = roundtrip(tensor, self.quantization)
            if isinstance(op, _Dequantize):
                self.dequantized += 1
                return tensor.to(dtype).contiguous()
        assert isinstance(op, _Merge)
        tensor = tensor.to(torch.promote_types(tensor.dtype, dtype))
        base = tensor if op.base is None else self.tensors[op.base].to(tensor.dtype)
        layer = self._twin(op.path, op.attr, base)
        merged = merged_layer(layer, [self.adapter], safe=True)
        self.merged += 1
        out = merged.get_parameter(op.attr)
        return out.detach().to(dtype).contiguous()

    @property
    def merge_dtype(self) -> torch.dtype | None:
        """The dtype the spec asks a quantized base's merged checkpoint in, if any."""
        q = self.quantization
        return None if q is None or q.merge_dtype is None else _SPEC_DTYPES[q.merge_dtype]

    def _model_key(self, key: str) -> str:
        """Checkpoint keys may lack or carry the base-model prefix (``model.``)."""
        if key in self.model_keys or not self.prefix:
            return key
        if f"{self.prefix}.{key}" in self.model_keys:
            return f"{self.prefix}.{key}"
        stripped = key.removeprefix(f"{self.prefix}.")
        return stripped if stripped in self.model_keys else key

    def _twin(self, path: str, attr: str, tensor: torch.Tensor) -> nn.Module:
        """A real copy of the target layer holding ``tensor`` as ``attr`` (its other
        parameters zeros), with the adapter's branch."""
        twin = _real_copy(self.layers[path], attr, tensor)
        target = self.targets[path]
        entry = method(target.method)
        init = getattr(target.settings, "init", None)
        if attr == "weight" and init in ("pissa", "olora", "loftq"):
            # the residual (LoftQ: the quantized weight) is the base weight the merge starts from
            _, replaced = entry.make_branch(kind_of(twin), twin, target.settings)
            twin._parameters["weight"] = nn.Parameter(replaced["weight"], requires_grad=False)
        branch = copy.deepcopy(self.branches[path]).to_empty(device="cpu")
        with torch.no_grad():
            for param in branch.parameters():
                param.zero_()
            for name, value in branch.file_tensors():  # the file's names (MHA: base_layer.…)
                value.copy_(self.tensors[f"{PREFIX}{path}.{name}"].to(value.dtype))
        twin.add_module(entry.child_name(self.adapter), branch)
        return twin


_FLOATS = ("F64", "F32", "F16", "BF16")


def _base_parameters(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``layer``'s own parameters by dotted name, its adapter branches left out."""
    return {
        name: p
        for name, p in layer.named_parameters()
        if not isinstance(layer._modules.get(name.partition(".")[0]), Branch)
    }


def _merged_weights(layer: nn.Module) -> list[str]:
    """The parameters of a target ``layer`` (on the meta device) that a merge replaces: those
    its kind writes anew when it writes the merged weight back (its bias only with a
    ``lora_bias``, handled apart)."""
    kind = kind_of(layer)
    new = kind.with_weights(layer, kind.weight(layer), None)
    own = _base_parameters(layer)
    return [name for name, p in _base_parameters(new).items() if p is not own.get(name)]


def _zeros_dtype(param: torch.Tensor, tensor: torch.Tensor) -> torch.dtype:
    """The checkpoint's float dtype (a layer reading two weights as one keeps it)."""
    return tensor.dtype if param.dtype.is_floating_point else param.dtype


def _real_copy(module: nn.Module, attr: str, tensor: torch.Tensor) -> nn.Module:
    """A copy of ``module`` (of the meta model) on the CPU: ``tensor`` as its parameter
    ``attr`` (a dotted name), every other parameter zeros (floats in ``tensor``'s dtype);
    children copied the same way, adapter branches left out."""
    head, _, rest = attr.partition(".")
    twin = copy.copy(module)
    twin._parameters = {
        k: None
        if p is None
        else nn.Parameter(
            tensor if k == attr else torch.zeros(p.shape, dtype=_zeros_dtype(p, tensor)),
            requires_grad=False,
        )
        for k, p in module._parameters.items()
    }
    twin._modules = {
        k: _real_copy(m, rest if k == head else "", tensor)
        for k, m in module._modules.items()
        if m is not None and not isinstance(m, Branch)
    }
    return twin


def _roots(meta: nn.Module) -> Iterator[tuple[nn.Module, str, str | None]]:
    """Where the adapter may have been trained: ``(module, its path + ".", key prefix to
    strip)``. The model itself; its base model (an adapter trained on ``AutoModel`` merged
    into a head checkpoint); or, for a bare checkpoint, the model with the adapter's keys
    losing the head model's ``base_model_prefix`` (an adapter trained with a head)."""
    yield meta, "", None
    prefix = str(getattr(meta, "base_model_prefix", "") or "")
    if not prefix:
        return
    inner = meta._modules.get(prefix)
    if isinstance(inner, nn.Module):
        yield inner, f"{prefix}.", None
    else:
        yield meta, "", f"{PREFIX}{prefix}."
