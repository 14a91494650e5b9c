"""Merging an adapter into a checkpoint on disk, one tensor at a time.

``merge_checkpoint(model_dir, adapter_dir, out_dir)`` reads the base checkpoint shard by
shard and writes it sharded like the input, with the config, tokenizer and other files
copied, and with everything the adapter trained in it:

- each adapted weight becomes ``W + s·ΔW`` (DoRA, PiSSA/OLoRA residuals and ``lora_bias``
  included, through the same layer rules as :func:`adaptc.merge`; both weights of an
  ``nn.MultiheadAttention``: ``in_proj_weight`` and ``out_proj.weight``);
- ``modules_to_save`` copies (a classifier head) and biases trained by ``bias: all`` or
  ``lora_only`` replace the checkpoint's tensors.

Peak memory is about one tensor plus the adapter: the model is only ever built on the
meta device, where the adapter is compiled to learn which tensors it must hold. The
adapter's keys may be relative to the checkpoint's model or to its base model (an adapter
trained on ``AutoModel`` merged into an ``…ForCausalLM`` checkpoint, or the reverse), as
PEFT's ``base_model.model.`` prefix allows. Everything is checked before anything is
written; the output directory appears whole or not at all (:func:`adaptc.atomic.staged_dir`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from adaptc.adapters.keys import PREFIX, adapter_branches
from adaptc.atomic import staged_dir
from adaptc.compiler import CompileError, compile, merge
from adaptc.io.load import (
    AdapterLoadError,
    choose_adapter,
    load_weights,
    read_weights,
    resolve_adapter_dir,
)
from adaptc.io.tensor_merger import DTYPES, TensorMerger, read_header
from adaptc.plan.replicate import ranges_text, spec_replication
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
    dequantized: int = 0  # weights of a quantized base written as W_deq (no update)


def merge_checkpoint(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    build_meta_model: Callable[[Spec], nn.Module],
    adapter: str | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    dtype: torch.dtype | None = None,
) -> MergeReport:
    """Write ``out_dir``: the checkpoint at ``model_dir`` with the adapter merged in.

    ``build_meta_model(spec)`` returns the checkpoint's model built on the meta device (no
    weights); ``adapter`` picks one adapter of a multi-adapter directory (peft's
    ``DIR/NAME/``); ``progress(n)`` is called after each tensor with the bytes it held.
    ``dtype`` writes every floating-point tensor in that dtype (default: the spec's
    ``base_model.quantization.merge_dtype``, else the checkpoint's own); the config's
    dtype and the index's total size follow.
    """
    source, out, shards, (spec, name, folder) = _inputs(
        model_dir, adapter_dir, out_dir, adapter, force
    )
    weights_path, tensors = read_weights(folder)
    meta = build_meta_model(spec)
    merger = TensorMerger.fit(meta, spec, name, tensors, weights_path)
    merger.check_checkpoint(source, shards)  # before writing anything
    dtype = dtype or merger.merge_dtype
    with staged_dir(out, replace=force) as staging:
        count = 0
        for shard in shards:
            count += _merge_shard(source / shard, staging / shard, merger, progress, dtype)
        for item in source.iterdir():  # config, tokenizer, generation config, the index, ...
            if item.name in shards or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        if dtype is not None:
            _retype_files(staging, dtype)
    return MergeReport(
        out, len(shards), count, merger.merged, merger.replaced, name, merger.dequantized
    )


def merge_in_memory(
    build_model: Callable[[int | None], nn.Module],
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    force: bool = False,
    errors: dict[str, float] | None = None,
) -> MergeReport:
    """Write ``out_dir`` by loading the model, the adapter and merging in memory.

    For an adapter whose task needs another class than the checkpoint's (a classifier
    trained on a base checkpoint): ``build_model(num_labels)`` loads the checkpoint's
    weights into that class, with as many labels as the adapter's head has (None when
    the head says nothing). Peak memory is the whole model; the output is that class's
    checkpoint (``save_pretrained``), with the tokenizer and other files copied. For a
    requantizing merge (the spec's ``base_model.quantization.merge``), ``build_model``
    loads the base quantized and the output is a quantized checkpoint; each layer's
    largest error goes into ``errors``.
    """
    source, out, shards, (spec, name, folder) = _inputs(
        model_dir, adapter_dir, out_dir, adapter, force
    )
    weights_path, tensors = read_weights(folder)
    model = build_model(_num_labels(tensors))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = compile(model, spec)
        with torch.no_grad():
            load_weights(new, name, folder)
    except (CompileError, ValueError) as exc:
        raise AdapterLoadError(
            f"the adapter {name!r} ({weights_path}) does not fit {type(model).__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the requantization's errors: in ``errors``
            merged = merge(new, adapters=[name], errors=errors)
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
        count = sum(len(read_header(staging / shard)[2]) - 1 for shard in written)
    targets = len({b.target for b in adapter_branches(new, name)})
    return MergeReport(out, len(written), count, targets, len(tensors), name)


def _inputs(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    adapter: str | None,
    force: bool,
) -> tuple[Path, Path, list[str], tuple[Spec, str, Path]]:
    """The checkpoint, the output (refused if it exists, without ``force``), the shards,
    and the chosen adapter: its one-adapter spec, name and folder."""
    source, out = Path(model_dir), Path(out_dir)
    shards = shard_names(source)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    chosen = choose_adapter(resolve_adapter_dir(adapter_dir), adapter)
    ranges = spec_replication(chosen[0])
    if ranges is not None:
        raise AdapterLoadError(
            f"adapter {chosen[1]!r} replicates the model's layers (layer_replication "
            f"{ranges_text(ranges)}): a merged checkpoint of the new stack is not written yet; "
            "adaptc.merge() merges it in memory"
        )
    return source, out, shards, chosen


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


def _merge_shard(
    src: Path,
    dst: Path,
    merger: TensorMerger,
    progress: Callable[[int], None] | None,
    out_dtype: torch.dtype | None = None,
) -> int:
    """Copy one safetensors file, replacing what the adapter changes; one tensor in memory.

    Replaced tensors keep their dtype and shape, so the header (and every offset) is copied
    as it is; untouched tensors are copied in chunks without being decoded. With
    ``out_dtype`` every floating-point tensor is written in it (a new header, new offsets).
    """
    count = 0
    size, raw_header, header = merger.headers[src.name]  # read by check_checkpoint
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    retyped = _retyped_header(header, entries, out_dtype)
    with src.open("rb") as fin, dst.open("wb") as fout:
        if retyped is None:
            fout.write(struct.pack("<Q", size) + raw_header)
        else:
            fout.write(struct.pack("<Q", len(retyped)) + retyped)
        start = 8 + size
        for key, entry in entries:
            begin, end = entry["data_offsets"]
            fin.seek(start + begin)
            cast = retyped is not None and str(entry["dtype"]) in _FLOATS
            if merger.wants(key) or cast:
                data = bytearray(end - begin)
                fin.readinto(data)
                dtype = DTYPES[str(entry["dtype"])]
                shape = list(entry["shape"])
                tensor = (
                    torch.frombuffer(data, dtype=dtype).reshape(shape)
                    if data
                    else torch.empty(shape, dtype=dtype)
                )
                want = out_dtype if cast else None
                new = merger.tensor(key, tensor, want) if merger.wants(key) else tensor.to(want)
                fout.write(new.contiguous().view(torch.uint8).numpy().tobytes())
            else:
                _copy_bytes(fin, fout, end - begin)
            count += 1
            if progress is not None:
                progress(end - begin)
        fout.flush()
        os.fsync(fout.fileno())
    return count


_FLOATS = ("F64", "F32", "F16", "BF16")


def _nbytes(entry: dict[str, Any], dtype: str | None = None) -> int:
    """Bytes of a header entry's tensor (in ``dtype``, a safetensors name, when given)."""
    return math.prod(int(d) for d in entry["shape"]) * DTYPES[dtype or str(entry["dtype"])].itemsize


def _retyped_header(
    header: dict[str, Any], entries: list[tuple[str, Any]], dtype: torch.dtype | None
) -> bytes | None:
    """The header of the shard with its floating-point tensors in ``dtype`` (their
    offsets moved), padded to 8 bytes as safetensors writes it; None when nothing changes."""
    if dtype is None:
        return None
    name = next(k for k, v in DTYPES.items() if v == dtype)
    if all(str(e["dtype"]) == name or str(e["dtype"]) not in _FLOATS for _, e in entries):
        return None
    new: dict[str, Any] = {}
    if "__metadata__" in header:
        new["__metadata__"] = header["__metadata__"]
    offset = 0
    for key, entry in entries:
        kind = name if str(entry["dtype"]) in _FLOATS else str(entry["dtype"])
        n = _nbytes(entry, kind)
        new[key] = {"dtype": kind, "shape": entry["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(new, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _retype_files(staging: Path, dtype: torch.dtype) -> None:
    """The config's dtype and the index's total size, for shards rewritten in ``dtype``."""
    config = staging / "config.json"
    if config.is_file():
        doc = json.loads(config.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if key in doc:
                doc[key] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    index = staging / INDEX_NAME
    if index.is_file():
        doc = json.loads(index.read_text(encoding="utf-8"))
        total = 0
        for shard in shard_names(staging):
            _, _, header = read_header(staging / shard)
            total += sum(_nbytes(e) for k, e in header.items() if k != "__metadata__")
        doc.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_bytes(fin: BinaryIO, fout: BinaryIO, n: int, chunk: int = 16 << 20) -> None:
    while n > 0:
        block = fin.read(min(chunk, n))
        if not block:
            raise AdapterLoadError(f"{fin.name} is truncated")
        fout.write(block)
        n -= len(block)
