"""Reading single tensors of a safetensors checkpoint lazily (the float weights LoftQ needs
for a quantized base), as PEFT's ``_SafetensorLoader``: one file, or shards listed by
``model.safetensors.index.json``; a name missing from the file is tried without, then
with, the model's ``base_model_prefix``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["checkpoint_reader"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def checkpoint_reader(
    path: str | os.PathLike[str], prefix: str | None = None
) -> Callable[[str], torch.Tensor]:
    """``read(name)`` for the checkpoint at ``path`` (a directory, or its ``.safetensors``
    file); ``prefix`` is the model's ``base_model_prefix`` (e.g. ``"model"``)."""
    source = Path(path)
    if source.is_dir():
        single = source / _SINGLE
    elif source.suffix == ".safetensors" or source.name.endswith(_SINGLE):
        single, source = source, source.parent
    else:
        single = source / _SINGLE
    files: dict[str, Path] = {}
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            files = dict.fromkeys(f.keys(), single)
    elif (source / _INDEX).is_file():
        try:
            index = json.loads((source / _INDEX).read_text(encoding="utf-8"))
            files = {k: source / v for k, v in index["weight_map"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"cannot read {source / _INDEX}: {exc}") from None
    else:
        raise FileNotFoundError(
            f"Could not find file for {single}, ensure that there is a (sharded) safetensors "
            "file of the model."
        )

    def read(name: str) -> torch.Tensor:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
        for key in candidates:
            if key in files:
                with safe_open(str(files[key]), framework="pt", device="cpu") as f:
                    tensor: torch.Tensor = f.get_tensor(key)
                    return tensor
        raise KeyError(f"{source} has no tensor {name!r}")

    return read
