"""PEFT's precision helpers: ``prepare_model_for_kbit_training`` and
``cast_mixed_precision_params``, with PEFT's semantics.

``prepare_model_for_kbit_training`` is called on the user's base model before adapting
it, and changes it in place (that is its job, as in PEFT): every parameter frozen,
half-precision ones upcast to float32 (bitsandbytes' packed 4-bit weights left as they
are), and, on a quantized model, input gradients plus gradient checkpointing turned on.
``cast_mixed_precision_params`` on an adapted model gives the frozen tensors the new
dtype without writing the user's model: the adapted model's frozen parameters share the
user's storage, and each gets a new tensor (``param.data = …`` rebinds, never copies in).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from adaptc.compiler import compiled_info, rebuild

__all__ = ["cast_mixed_precision_params", "prepare_model_for_kbit_training", "require_input_grads"]

_NOT_UPCAST = ("gptq", "aqlm", "eetq", "hqq", "torchao")  # quantization methods PEFT skips


def prepare_model_for_kbit_training(
    model: Any,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> Any:
    """Prepare a (quantized) transformers model for training adapters, as PEFT's: freeze
    it, upcast float16/bfloat16 parameters to float32, and on a quantized model make the
    input embeddings' output require grad and enable gradient checkpointing. In place;
    returns ``model``."""
    method = getattr(model, "quantization_method", None)
    in_kbit = bool(
        getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    )
    skips_upcast = method in _NOT_UPCAST or bool(getattr(model, "hqq_quantized", False))
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    if not skips_upcast:
        for param in model.parameters():
            half = param.dtype in (torch.float16, torch.bfloat16)
            if half and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if (in_kbit or skips_upcast) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            require_input_grads(model)
        takes_kwargs = (
            "gradient_checkpointing_kwargs"
            in inspect.signature(model.gradient_checkpointing_enable).parameters
        )
        if not takes_kwargs and kwargs:
            warnings.warn(
                "gradient_checkpointing_kwargs is not supported in this version of transformers. "
                "The passed kwargs will be ignored.",
                FutureWarning,
                stacklevel=2,
            )
        model.gradient_checkpointing_enable(
            **({"gradient_checkpointing_kwargs": kwargs} if takes_kwargs else {})
        )
    return model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (float16 or bfloat16), trainable ones to float32, as
    PEFT's. Each parameter gets a new tensor: storage shared with another model is not
    written."""
    for p in model.parameters():
        p.data = p.to(dtype) if not p.requires_grad else p.to(torch.float32)
    for module in model.modules():  # the adapted graphs cast where dtypes differ: re-emit
        info = compiled_info(module)
        if info is not None:
            rebuild(module, info.active)


def require_input_grads(model: Any) -> None:
    """Make the input embeddings' output require grad (what gradient checkpointing needs
    when the inputs do not), as PEFT does: transformers' ``enable_input_require_grads``,
    or a forward hook on ``get_input_embeddings()``."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(_output_requires_grad)


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)
