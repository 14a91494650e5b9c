"""The public functions that return a new adapted model, with the integrations' hooks.

``adaptc.compile``, ``adaptc.merge`` and ``adaptc.load_adapter`` are the compiler's and
io's functions followed by :mod:`adaptc.integrations.transformers`' hook: a compiled
transformers model's ``save_pretrained`` writes its adapter, and ``transformers.Trainer``
saves and loads adapters in checkpoints (``on_compile``); a merged model saves in full
again (``on_merge``). The compiler itself never calls up into the integrations.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from adaptc import compiler, io
from adaptc.adapters import loftq
from adaptc.compiler import compiled_info
from adaptc.integrations.transformers import on_compile, on_merge
from adaptc.io.tensors import checkpoint_reader
from adaptc.spec import Spec

__all__ = ["compile", "initialize_loftq", "load_adapter", "merge"]


def compile(model: nn.Module, spec: Spec | Any) -> nn.Module:
    """A new model with the spec's adapters; ``model`` is left untouched.

    Base weights are shared with ``model`` (new frozen ``Parameter`` objects over the same
    storage), adapter weights are new. The first adapter of the spec is active. With
    ``merge: true`` in the spec, the adapters are merged (:func:`merge`).
    """
    return _hooked(compiler.compile(model, spec))


def merge(model: nn.Module, **options: Any) -> nn.Module:
    """A new model with the adapters folded into the base weights and no adapter nodes
    (:func:`adaptc.compiler.compile.merge`, whose options it takes: ``adapters``, ``safe``,
    and for quantized bases ``quantized``, ``dtype``, ``errors``)."""
    return _hooked(compiler.merge(model, **options))


def load_adapter(model: nn.Module, source: str | os.PathLike[str], **options: Any) -> nn.Module:
    """A new model: ``model`` (untouched) with the adapter(s) saved at ``source``
    (:func:`adaptc.io.load.load_adapter`, whose options it takes)."""
    return _hooked(io.load_adapter(model, source, **options))


def initialize_loftq(
    model: nn.Module, weights: loftq.FloatWeights | str | os.PathLike[str], **options: Any
) -> dict[str, Any]:
    """LoftQ factors for the LoRA of a compiled model on a quantized base, in place; each
    layer's approximation error (:func:`adaptc.adapters.loftq.initialize_loftq`, whose
    options it takes: ``adapter``, ``callback``). ``weights``: the float model's
    checkpoint (a directory or ``.safetensors`` file), state dict, or the float model."""
    if isinstance(weights, (str, os.PathLike)):
        prefix = getattr(model, "base_model_prefix", None)
        weights = checkpoint_reader(weights, prefix=prefix or None)
    return dict(loftq.initialize_loftq(model, weights, **options))


def _hooked(model: nn.Module) -> nn.Module:
    if compiled_info(model) is not None:
        on_compile(model)
    else:
        on_merge(model)
    return model
