"""Merging an adapter into a checkpoint on disk, one tensor at a time.

``merge_checkpoint(model_dir, adapter_dir, out_dir)`` reads the base checkpoint shard by
shard, replaces each adapted weight with ``W + s·ΔW`` (DoRA, PiSSA/OLoRA residuals and
``lora_bias`` included, through the same layer rules as :func:`adaptc.merge`), and writes
a checkpoint sharded like the input, with the config, tokenizer and other files copied.
Peak memory is about one shard plus the adapter: the model is only ever built on the
meta device, to know each target's layer type. The output directory appears whole or
not at all.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from adaptc.compiler.passes import merged_layer
from adaptc.io.keys import PREFIX
from adaptc.io.load import AdapterLoadError, _read_spec, _read_weights, resolve_adapter_dir
from adaptc.layers import rule_for
from adaptc.plan.plan import PlannedTarget, build_plan
from adaptc.spec import Spec

__all__ = ["MergeReport", "merge_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    shards: int
    tensors: int
    merged: int


def merge_checkpoint(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    build_meta_model: Callable[[Path, Spec], nn.Module],
    adapter: str | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> MergeReport:
    """Write ``out_dir``: the checkpoint at ``model_dir`` with the adapter merged in.

    ``build_meta_model(model_dir, spec)`` returns the model built on the meta device (no
    weights); ``progress(n)`` is called after each tensor with the bytes it held.
    """
    source, out = Path(model_dir), Path(out_dir)
    shards = _shards(source)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    spec, folders = _read_spec(resolve_adapter_dir(adapter_dir), adapter or "default")
    name = adapter or next(iter(spec.adapters))
    if name not in spec.adapters:
        raise AdapterLoadError(
            f"{adapter_dir} has no adapter {name!r} (has: {', '.join(spec.adapters)})"
        )
    meta = build_meta_model(source, spec)
    plan = build_plan(meta, spec)
    targets = {t.path: t for t in plan.targets if t.adapter == name}
    weights_path, adapter_tensors = _read_weights(folders[name])
    merger = _Merger(meta, spec, name, targets, adapter_tensors, weights_path)
    merger.check_fits()  # before writing anything

    staging = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    )
    try:
        count = merged = 0
        for shard in shards:
            n, m = _merge_shard(source / shard, staging / shard, merger, progress)
            count, merged = count + n, merged + m
        merger.check_all_merged()
        for item in source.iterdir():  # config, tokenizer, generation config, the index, ...
            if item.name in shards or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MergeReport(out, len(shards), count, merged)


def _merge_shard(
    src: Path, dst: Path, merger: _Merger, progress: Callable[[int], None] | None
) -> tuple[int, int]:
    """Copy one safetensors file, replacing adapted tensors; one tensor in memory at a time.

    Merged tensors keep their dtype and shape, so the header (and every offset) is copied
    as it is; untouched tensors are copied in chunks without being decoded.
    """
    count = merged = 0
    with src.open("rb") as fin, dst.open("wb") as fout:
        (size,) = struct.unpack("<Q", fin.read(8))
        raw_header = fin.read(size)
        header = json.loads(raw_header)
        fout.write(struct.pack("<Q", size) + raw_header)
        start = 8 + size
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        for key, entry in entries:
            begin, end = entry["data_offsets"]
            fin.seek(start + begin)
            if merger.wants(key) and entry["dtype"] in _DTYPES:
                data = bytearray(end - begin)
                fin.readinto(data)
                dtype = _DTYPES[entry["dtype"]]
                tensor = (
                    torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])
                    if data
                    else (torch.empty(entry["shape"], dtype=dtype))
                )
                new = merger.tensor(key, tensor)
                fout.write(new.contiguous().view(torch.uint8).numpy().tobytes())
                merged += 1
            else:
                _copy_bytes(fin, fout, end - begin)
            count += 1
            if progress is not None:
                progress(end - begin)
        fout.flush()
        os.fsync(fout.fileno())
    return count, merged


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
}


def _shards(source: Path) -> list[str]:
    if not source.is_dir():
        raise AdapterLoadError(f"no model directory at {source}")
    if (source / INDEX_NAME).is_file():
        index = json.loads((source / INDEX_NAME).read_text(encoding="utf-8"))
        return sorted(set(index["weight_map"].values()))
    if (source / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    raise AdapterLoadError(
        f"{source} has no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are merged)"
    )


class _Merger:
    """Maps checkpoint keys to planned targets and merges one tensor at a time."""

    def __init__(
        self,
        meta: nn.Module,
        spec: Spec,
        adapter: str,
        targets: dict[str, PlannedTarget],
        tensors: dict[str, torch.Tensor],
        weights_path: Path,
    ) -> None:
        self.meta, self.spec, self.adapter = meta, spec, adapter
        self.targets, self.tensors, self.weights_path = targets, tensors, weights_path
        self.prefix = getattr(meta, "base_model_prefix", "")
        self.done: set[str] = set()

    def wants(self, key: str) -> bool:
        """Whether ``key`` is a tensor the merge changes."""
        path, _, attr = self._model_key(key).rpartition(".")
        if path not in self.targets:
            return False
        return attr == "weight" or (attr == "bias" and self.spec.adapters[self.adapter].lora_bias)

    def tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        path, _, attr = self._model_key(key).rpartition(".")
        target = self.targets.get(path)
        if target is None or attr not in ("weight", "bias"):
            return tensor
        if attr == "bias" and not self.spec.adapters[self.adapter].lora_bias:
            return tensor  # only lora_bias changes a bias
        layer = self._twin(path, attr, tensor)
        merged = merged_layer(layer, [self.adapter], safe=True)
        self.done.add(f"{path}.{attr}")
        out = getattr(merged, attr)
        assert isinstance(out, torch.Tensor)
        return out.detach().to(tensor.dtype).contiguous()

    def check_fits(self) -> None:
        """The adapter file holds exactly the LoRA tensors this model's targets need."""
        needed = set()
        for path, target in self.targets.items():
            cfg = target.branch_config(self.spec.adapters[self.adapter])
            leaf = self.meta.get_submodule(path)
            rule = rule_for(leaf)
            assert rule is not None
            branch, _ = rule.make_branch(_meta_copy(leaf), cfg)
            needed |= {f"{PREFIX}{path}.{n}" for n, _ in branch.named_parameters()}
        present = {k for k in self.tensors if ".lora_" in k}
        missing, extra = sorted(needed - present), sorted(present - needed)
        if missing or extra:
            problem = (f"{len(missing)} missing (e.g. {missing[0]})" if missing
                       else f"{len(extra)} unexpected (e.g. {extra[0]})")  # fmt: skip
            raise AdapterLoadError(
                f"the adapter {self.weights_path} does not fit this model: LoRA tensors {problem}"
            )

    def check_all_merged(self) -> None:
        missing = [p for p in self.targets if f"{p}.weight" not in self.done]
        if missing:
            raise AdapterLoadError(
                f"the checkpoint has no weight for {len(missing)} adapted module(s), "
                f"e.g. {missing[0]}"
            )

    def _model_key(self, key: str) -> str:
        """Checkpoint keys may lack or carry the base-model prefix (``model.``)."""
        if key.rpartition(".")[0] in self.targets:
            return key
        if self.prefix and f"{self.prefix}.{key}".rpartition(".")[0] in self.targets:
            return f"{self.prefix}.{key}"
        return key

    def _twin(self, path: str, attr: str, tensor: torch.Tensor) -> nn.Module:
        """A real copy of the meta layer holding ``tensor``, with the adapter's branch."""
        leaf = self.meta.get_submodule(path)
        rule = rule_for(leaf)
        assert rule is not None
        twin = copy.copy(leaf)
        twin._modules = {}
        twin._parameters = {
            k: nn.Parameter(
                torch.zeros_like(p, device="cpu") if k != attr else tensor, requires_grad=False
            )
            if p is not None
            else None
            for k, p in leaf._parameters.items()
        }
        target = self.targets[path]
        cfg = target.branch_config(self.spec.adapters[self.adapter])
        if attr == "weight" and cfg.init in ("pissa", "olora"):  # the residual is the base
            _, replaced = rule.make_branch(twin, cfg)
            twin._parameters["weight"] = nn.Parameter(replaced["weight"], requires_grad=False)
        branch, _ = rule.make_branch(_meta_copy(twin), cfg)
        branch = branch.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in branch.named_parameters():
                key = f"{PREFIX}{path}.{name}"
                if key not in self.tensors:
                    raise AdapterLoadError(f"{self.weights_path} has no {key}")
                param.copy_(self.tensors[key].to(param.dtype))
        twin.add_module(f"lora_{self.adapter}", branch)
        return twin


def _meta_copy(layer: nn.Module) -> nn.Module:
    twin = copy.copy(layer)
    twin._modules = {}
    twin._parameters = {
        k: None if p is None else nn.Parameter(p.detach().to("meta"), requires_grad=False)
        for k, p in layer._parameters.items()
    }
    return twin


def _replace_dir(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
