"""What a forward leaves for backward: the bytes of the tensors it created that are still
alive afterwards (saved for backward, and the outputs).

:func:`held_bytes` watches every tensor the call creates (a dispatch mode, below autograd,
so saved-tensor hooks and the compiler's own passes run as they would) and counts, after
it, the storages still alive, each once. Unlike a saved-tensor hook, it sees what the
rematerialising passes keep (their hooks step aside for an outer hook) and what they
recompute (nothing is kept of that).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["held_bytes"]


class _Created(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tensors: list[weakref.ref[torch.Tensor]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.tensors.append(weakref.ref(t))
        return out


def held_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """``(bytes, result)``: the storages created by ``fn()`` that are alive while its
    result is, each counted once, except those of ``exclude`` (a model's parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    mode = _Created()
    with mode:
        result = fn()
    alive: dict[int, int] = {}
    for ref in mode.tensors:
        t = ref()
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            alive[storage.data_ptr()] = storage.nbytes()
    return sum(alive.values()), result
