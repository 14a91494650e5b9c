"""Adapter directories: small fixes around ``adaptc.save_adapter`` / ``load_adapter``.

- ``private_embeddings``: PEFT saves the base weights of targeted ``embed_tokens`` /
  ``lm_head`` layers with the adapter, and ``adaptc.load_adapter`` copies them into the
  weights the new model shares with the base model. Loading onto a clone whose embedding
  weights have their own storage keeps the caller's model untouched.
- ``write_spec_subset``: ``save_adapter(adapters=[...])`` writes every adapter of the spec
  into ``adaptc_spec.yaml``; the directory must describe only the adapters it holds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from adaptc.compiler.clone import share_clone
from adaptc.spec import NameTargets, Spec, SpecError, load_spec
from adaptc.spec.dump import dump_spec
from adaptc.spec.load import SPEC_FILE_NAME

__all__ = ["EMBEDDING_LAYER_NAMES", "private_embeddings", "write_spec_subset"]

EMBEDDING_LAYER_NAMES = frozenset({"embed_tokens", "lm_head"})


def private_embeddings(model: nn.Module, directory: Path) -> nn.Module:
    """``model`` itself, or a weight-sharing clone whose targeted embeddings own their storage."""
    try:
        spec = load_spec(directory)
    except (SpecError, OSError, ValueError):
        return model  # load_adapter reports the problem
    names: set[str] = set()
    for adapter in spec.adapters.values():
        if isinstance(adapter.targets, NameTargets):
            names |= EMBEDDING_LAYER_NAMES & set(adapter.targets.names)
    if not names:
        return model
    clone = share_clone(model)
    done: set[int] = set()
    for path, module in clone.named_modules(remove_duplicate=False):
        if path.rpartition(".")[2] in names:
            for p in module._parameters.values():
                if p is not None and not p.is_meta and id(p) not in done:
                    p.data = p.data.clone()  # tied parameters are one object: they stay tied
                    done.add(id(p))
    return clone


def write_spec_subset(directory: Path, spec: Spec, names: list[str]) -> None:
    """Replace ``adaptc_spec.yaml`` with the spec of the adapters ``names`` only."""
    subset = Spec(
        version=1,
        base_model=spec.base_model,
        task_type=spec.task_type,
        adapters={n: spec.adapters[n] for n in names},
        merge=spec.merge,
    )
    fd, tmp = tempfile.mkstemp(prefix=".adaptc_spec.", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(dump_spec(subset))
    os.replace(tmp, directory / SPEC_FILE_NAME)
