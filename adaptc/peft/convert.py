"""PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=…)``: a PiSSA/OLoRA
adapter saved as a plain LoRA adapter for the *unchanged* base model.

PiSSA and OLoRA start from factors taken out of the base weight (``W = W_res + s·B₀A₀``)
and train on ``W_res``. Knowing the initial factors (the adapter saved before training,
at ``path``), the trained update is ``ΔW = s·(BA − B₀A₀) = s·[B | −B₀]·[A ; A₀]``: a LoRA
of twice the rank with the same scaling (``lora_alpha`` doubled too; ``·√2`` with rsLoRA),
which loads on the original base model like any LoRA adapter.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from adaptc.adapters.keys import adapter_state_dict
from adaptc.api import compile
from adaptc.compiler import compiled
from adaptc.io.load import AdapterLoadError, load_state, read_weights

__all__ = ["as_plain_lora"]

_CONVERTED_INITS = ("pissa", "olora", "default")  # what PEFT converts (it warns on others)
_A_KEYS = ("lora_A.weight", "lora_embedding_A")
_B_KEYS = ("lora_B.weight", "lora_embedding_B")


def as_plain_lora(
    model: nn.Module, original: nn.Module, names: list[str], path: str | os.PathLike[str]
) -> nn.Module:
    """A new model: ``original`` with each of ``names`` converted to plain LoRA against the
    initial adapter saved at ``path`` (PEFT's files); ``model`` is the trained one."""
    info = compiled(model, "save_pretrained()")
    _, initial = read_weights(Path(path))
    converted, tensors = {}, {}
    for name in names:
        settings = info.spec.adapters[name]
        if getattr(settings, "method", "lora") != "lora":
            raise ValueError(f"adapter {name!r}: only LoRA adapters can be converted")
        if settings.use_dora:
            raise ValueError(
                f"adapter {name!r} uses DoRA: its magnitude cannot be expressed as a LoRA update"
            )
        if settings.use_rslora and (settings.rank_pattern or settings.alpha_pattern):
            raise ValueError(
                "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not "
                "supported when using `rank_pattern` or `alpha_pattern` at the same time as "
                "`use_rslora=True`."
            )
        if settings.init not in _CONVERTED_INITS:
            warnings.warn(
                "`path_initial_model_for_weight_conversion` only works for converting a "
                "PiSSA/CorDA/OLoRA/LoRA-GA adapter to a LoRA adapter",
                UserWarning,
                stacklevel=3,
            )
        factor = math.sqrt(2) if settings.use_rslora else 2
        converted[name] = settings.model_copy(
            update={
                "r": 2 * settings.r,
                "lora_alpha": settings.lora_alpha * factor,
                "rank_pattern": {k: 2 * v for k, v in settings.rank_pattern.items()},
                "alpha_pattern": {k: 2 * v for k, v in settings.alpha_pattern.items()},
                "init": "default",
                "pissa_niter": None,
            }
        )
        tensors[name] = _stacked(adapter_state_dict(model, name), initial, Path(path))
    new = compile(original, info.spec.with_adapters(converted))
    for name in names:
        load_state(new, name, tensors[name], source=f"the conversion against {path}")
    return new


def _stacked(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """``A → [A ; A₀]``, ``B → [B | −B₀]``; the other tensors as trained."""
    out = dict(trained)
    for key, value in trained.items():
        is_a, is_b = key.endswith(_A_KEYS), key.endswith(_B_KEYS)
        if not (is_a or is_b):
            continue
        start = initial.get(key)
        if start is None or start.shape != value.shape:
            raise AdapterLoadError(
                f"{path} is not this adapter's initial state: "
                + (f"it has no {key}" if start is None else f"{key} has shape {tuple(start.shape)}")
            )
        start = start.to(value.dtype)
        out[key] = torch.cat([value, start], dim=0) if is_a else torch.cat([value, -start], dim=1)
    return out
