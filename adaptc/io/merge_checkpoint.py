"""Merging an adapter into a checkpoint on disk, one tensor at a time.

``merge_checkpoint(model_dir, adapter_dir, out_dir)`` reads the base checkpoint shard by
shard and writes it sharded like the input, with the config, tokenizer and other files
copied, and with everything the adapter trained in it:

- each adapted weight becomes ``W + s·ΔW`` (DoRA, PiSSA/OLoRA residuals and ``lora_bias``
  included, through the same layer rules as :func:`adaptc.merge`);
- ``modules_to_save`` copies (a classifier head) and biases trained by ``bias: all`` or
  ``lora_only`` replace the checkpoint's tensors.

Peak memory is about one tensor plus the adapter: the model is only ever built on the
meta device, where the adapter is compiled to learn which tensors it must hold. The
adapter's keys may be relative to the checkpoint's model or to its base model (an adapter
trained on ``AutoModel`` merged into an ``…ForCausalLM`` checkpoint, or the reverse), as
PEFT's ``base_model.model.`` prefix allows. Everything is checked before anything is
written; the output directory appears whole or not at all (:func:`adaptc._io.staged_dir`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from adaptc._io import staged_dir
from adaptc.compiler.compile import CompileError, compile, compiled_info, merge
from adaptc.compiler.passes import merged_layer
from adaptc.io.keys import PREFIX, adapter_tensors
from adaptc.io.load import (
    AdapterLoadError,
    _is_base_tensor,
    _load_weights,
    _read_weights,
    choose_adapter,
    resolve_adapter_dir,
)
from adaptc.layers import LoraBranch, rule_for
from adaptc.plan.plan import PlannedTarget
from adaptc.spec import Spec

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "MergeReport",
    "merge_checkpoint",
    "merge_in_memory",
    "shard_names",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    shards: int
    tensors: int
    merged: int  # weights (and biases) that became W + s·ΔW
    replaced: int = 0  # tensors taken from the adapter (saved modules, trained biases)
    adapter: str = "default"


def merge_checkpoint(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    build_meta_model: Callable[[Spec], nn.Module],
    adapter: str | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> MergeReport:
    """Write ``out_dir``: the checkpoint at ``model_dir`` with the adapter merged in.

    ``build_meta_model(spec)`` returns the checkpoint's model built on the meta device (no
    weights); ``adapter`` picks one adapter of a multi-adapter directory (peft's
    ``DIR/NAME/``); ``progress(n)`` is called after each tensor with the bytes it held.
    """
    source, out = Path(model_dir), Path(out_dir)
    shards = shard_names(source)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    spec, name, folder = choose_adapter(resolve_adapter_dir(adapter_dir), adapter)
    weights_path, tensors = _read_weights(folder)
    meta = build_meta_model(spec)
    merger = _Merger.fit(meta, spec, name, tensors, weights_path)
    merger.check_checkpoint(source, shards)  # before writing anything
    with staged_dir(out, replace=force) as staging:
        count = 0
        for shard in shards:
            count += _merge_shard(source / shard, staging / shard, merger, progress)
        merger.check_all_done()
        for item in source.iterdir():  # config, tokenizer, generation config, the index, ...
            if item.name in shards or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, staging / item.name)
    return MergeReport(out, len(shards), count, merger.merged, merger.replaced, name)


def merge_in_memory(
    build_model: Callable[[int | None], nn.Module],
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    force: bool = False,
) -> MergeReport:
    """Write ``out_dir`` by loading the model, the adapter and merging in memory.

    For an adapter whose task needs another class than the checkpoint's (a classifier
    trained on a base checkpoint): ``build_model(num_labels)`` loads the checkpoint's
    weights into that class, with as many labels as the adapter's head has (None when
    the head says nothing). Peak memory is the whole model; the output is that class's
    checkpoint (``save_pretrained``), with the tokenizer and other files copied.
    """
    source, out = Path(model_dir), Path(out_dir)
    shards = shard_names(source)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    spec, name, folder = choose_adapter(resolve_adapter_dir(adapter_dir), adapter)
    weights_path, tensors = _read_weights(folder)
    model = build_model(_num_labels(tensors))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = compile(model, spec)
        with torch.no_grad():
            _load_weights(new, name, folder)
    except (CompileError, ValueError) as exc:
        raise AdapterLoadError(
            f"the adapter {name!r} ({weights_path}) does not fit {type(model).__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    try:
        merged = merge(new, adapters=[name])
    except ValueError as exc:  # a non-finite merged weight, lora_bias without a bias
        raise AdapterLoadError(f"adapter {name!r}: {str(exc).splitlines()[0]}") from None
    largest = max((source / shard).stat().st_size for shard in shards)
    with staged_dir(out, replace=force) as staging:
        merged.save_pretrained(staging, max_shard_size=max(largest, 1 << 20))  # type: ignore[operator]
        for item in source.iterdir():  # the tokenizer and the like; not the old weights
            if (
                item.is_file()
                and not (staging / item.name).exists()
                and not (
                    item.name.startswith(".") or item.name in shards or item.name == INDEX_NAME
                )
            ):
                shutil.copy2(item, staging / item.name)
        written = shard_names(staging)
        count = sum(len(_read_header(staging / shard)[2]) - 1 for shard in written)
    targets = len({b.target for b in _branches(new, name)})
    return MergeReport(out, len(written), count, targets, len(tensors), name)


def _num_labels(tensors: dict[str, torch.Tensor]) -> int | None:
    """The label count of a saved classifier head (``score``, ``classifier``, its
    ``out_proj``): the rows of its last weight. None when the adapter saves no head."""
    best: tuple[int, int] | None = None
    for key, tensor in tensors.items():
        parts = key.removeprefix(PREFIX).split(".")
        if tensor.dim() != 2 or parts[-1] != "weight":
            continue
        for rank, head in enumerate((("score",), ("classifier",), ("classifier", "out_proj"))):
            if tuple(parts[-1 - len(head) : -1]) == head and (best is None or rank > best[0]):
                best = (rank, int(tensor.shape[0]))
    return None if best is None else best[1]


def shard_names(source: Path) -> list[str]:
    """The safetensors files of the checkpoint at ``source``."""
    if not source.is_dir():
        raise AdapterLoadError(f"no model directory at {source}")
    if (source / INDEX_NAME).is_file():
        try:
            index = json.loads((source / INDEX_NAME).read_text(encoding="utf-8"))
            return sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AdapterLoadError(f"cannot read {source / INDEX_NAME}: {exc}") from None
    if (source / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    raise AdapterLoadError(
        f"{source} has no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are merged)"
    )


def _read_header(path: Path) -> tuple[int, bytes, dict[str, Any]]:
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


def _merge_shard(
    src: Path, dst: Path, merger: _Merger, progress: Callable[[int], None] | None
) -> int:
    """Copy one safetensors file, replacing what the adapter changes; one tensor in memory.

    Replaced tensors keep their dtype and shape, so the header (and every offset) is copied
    as it is; untouched tensors are copied in chunks without being decoded.
    """
    count = 0
    size, raw_header, header = _read_header(src)
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.write(struct.pack("<Q", size) + raw_header)
        start = 8 + size
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        for key, entry in entries:
            begin, end = entry["data_offsets"]
            fin.seek(start + begin)
            if merger.wants(key):
                data = bytearray(end - begin)
                fin.readinto(data)
                dtype = _DTYPES[str(entry["dtype"])]
                shape = list(entry["shape"])
                tensor = (
                    torch.frombuffer(data, dtype=dtype).reshape(shape)
                    if data
                    else torch.empty(shape, dtype=dtype)
                )
                new = merger.tensor(key, tensor)
                fout.write(new.contiguous().view(torch.uint8).numpy().tobytes())
            else:
                _copy_bytes(fin, fout, end - begin)
            count += 1
            if progress is not None:
                progress(end - begin)
        fout.flush()
        os.fsync(fout.fileno())
    return count


def _copy_bytes(fin: BinaryIO, fout: BinaryIO, n: int, chunk: int = 16 << 20) -> None:
    while n > 0:
        block = fin.read(min(chunk, n))
        if not block:
            raise AdapterLoadError(f"{fin.name} is truncated")
        fout.write(block)
        n -= len(block)


_DTYPES = {
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
    """``W + s·ΔW`` for the ``attr`` of the target at ``path``; ``base`` is the adapter key
    of a trained bias that replaces the checkpoint's before the LoRA bias is added."""

    path: str
    attr: str
    base: str | None = None


@dataclass(frozen=True)
class _Copy:
    """The adapter's tensor under ``key`` (a saved module's copy, a trained bias)."""

    key: str


class _Merger:
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
        self.meta, self.compiled, self.root = meta, compiled, root
        self.spec, self.adapter = spec, adapter
        self.tensors, self.weights_path = tensors, weights_path
        self.prefix = str(getattr(meta, "base_model_prefix", "") or "")
        self.model_keys = set(meta.state_dict(keep_vars=True))
        self.branches = {b.target: b for b in _branches(compiled, adapter)}
        self.layers = {
            b.target: layer
            for layer in compiled.modules()
            for b in layer.children()
            if isinstance(b, LoraBranch) and b.adapter == adapter
        }
        info = compiled_info(compiled)
        assert info is not None
        self.targets: dict[str, PlannedTarget] = {
            t.path: t for t in info.plan.targets if t.adapter == adapter
        }
        self.ops: dict[str, _Merge | _Copy] = {}  # model key (of ``meta``) -> what replaces it
        lora = {f"{PREFIX}{b.target}.{n}" for b in self.branches.values() for n, _ in
                b.file_tensors()}  # fmt: skip
        for path, branch in self.branches.items():
            self.ops[f"{root}{path}.weight"] = _Merge(path, "weight")
            if branch.lora_bias:
                self.ops[f"{root}{path}.bias"] = _Merge(path, "bias")
        for key in tensors:
            if key in lora or _is_base_tensor(key):  # a targeted embedding's frozen weight
                continue
            model_key = root + key.removeprefix(PREFIX).replace(".base_layer.", ".")
            existing = self.ops.get(model_key)
            if isinstance(existing, _Merge):  # a trained bias under a LoRA bias
                self.ops[model_key] = _Merge(existing.path, existing.attr, base=key)
            else:
                self.ops[model_key] = _Copy(key)
        self.by_checkpoint_key: dict[str, str] = {}
        self.done: set[str] = set()
        self.merged = self.replaced = 0

    @classmethod
    def fit(
        cls,
        meta: nn.Module,
        spec: Spec,
        adapter: str,
        tensors: dict[str, torch.Tensor],
        weights_path: Path,
    ) -> _Merger:
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
        for path, branch in self.branches.items():
            if branch.lora_bias and getattr(self.layers[path], "bias", None) is None:
                raise AdapterLoadError(
                    f"{name}: {self.root}{path} has lora_bias but the layer has no bias, so "
                    "the update cannot be merged into the checkpoint (peft refuses it too)"
                )

    def check_checkpoint(self, source: Path, shards: list[str]) -> None:
        """Every tensor the merge replaces is in the checkpoint, with the adapter's shape."""
        for shard in shards:
            _, _, header = _read_header(source / shard)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                model_key = self._model_key(key)
                op = self.ops.get(model_key)
                if op is None:
                    continue
                if str(entry["dtype"]) not in _DTYPES or (
                    isinstance(op, _Merge) and str(entry["dtype"]) not in _FLOATS
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
            what = "an adapted weight" if isinstance(op, _Merge) else f"the adapter's {op.key}"
            raise AdapterLoadError(
                f"the checkpoint {source} holds no tensor {absent[0]} ({what}; a tied or "
                f"missing weight?): {len(absent)} such tensor(s), nothing written"
            )

    def wants(self, key: str) -> bool:
        """Whether the checkpoint tensor ``key`` changes."""
        return key in self.by_checkpoint_key

    def tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The new value of the checkpoint tensor ``key`` (same dtype and shape)."""
        model_key = self.by_checkpoint_key[key]
        op = self.ops[model_key]
        self.done.add(model_key)
        if isinstance(op, _Copy):
            self.replaced += 1
            return self.tensors[op.key].detach().to(tensor.dtype).contiguous()
        base = tensor if op.base is None else self.tensors[op.base].to(tensor.dtype)
        layer = self._twin(op.path, op.attr, base)
        merged = merged_layer(layer, [self.adapter], safe=True)
        self.merged += 1
        out = getattr(merged, op.attr)
        assert isinstance(out, torch.Tensor)
        return out.detach().to(tensor.dtype).contiguous()

    def check_all_done(self) -> None:
        missing = sorted(set(self.ops) - self.done)
        if missing:
            raise AdapterLoadError(
                f"the checkpoint has no tensor for {len(missing)} adapted module(s), "
                f"e.g. {missing[0]}"
            )

    def _model_key(self, key: str) -> str:
        """Checkpoint keys may lack or carry the base-model prefix (``model.``)."""
        if key in self.model_keys or not self.prefix:
            return key
        if f"{self.prefix}.{key}" in self.model_keys:
            return f"{self.prefix}.{key}"
        stripped = key.removeprefix(f"{self.prefix}.")
        return stripped if stripped in self.model_keys else key

    def _twin(self, path: str, attr: str, tensor: torch.Tensor) -> nn.Module:
        """A real copy of the target layer holding ``tensor``, with the adapter's branch."""
        leaf = self.layers[path]
        twin = copy.copy(leaf)
        twin._modules = {}
        twin._parameters = {
            k: nn.Parameter(
                torch.zeros(p.shape, dtype=p.dtype) if k != attr else tensor, requires_grad=False
            )
            if p is not None
            else None
            for k, p in leaf._parameters.items()
        }
        cfg = self.targets[path].branch_config(self.spec.adapters[self.adapter])
        rule = rule_for(twin)
        assert rule is not None
        if attr == "weight" and cfg.init in ("pissa", "olora"):  # the residual is the base
            _, replaced = rule.make_branch(twin, cfg)
            twin._parameters["weight"] = nn.Parameter(replaced["weight"], requires_grad=False)
        branch = copy.deepcopy(self.branches[path]).to_empty(device="cpu")
        with torch.no_grad():
            for name, param in branch.named_parameters():
                param.copy_(self.tensors[f"{PREFIX}{path}.{name}"].to(param.dtype))
        twin.add_module(f"lora_{self.adapter}", branch)
        return twin


_FLOATS = ("F64", "F32", "F16", "BF16")


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


def _branches(model: nn.Module, adapter: str) -> list[LoraBranch]:
    seen: dict[str, LoraBranch] = {}
    for module in model.modules():
        if isinstance(module, LoraBranch) and module.adapter == adapter:
            seen.setdefault(module.target, module)
    return list(seen.values())
