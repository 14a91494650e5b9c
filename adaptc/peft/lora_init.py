"""PEFT's functions for LoRA inits that need more than the base weight: LoftQ on a
quantized base (``replace_lora_weights_loftq``) and EVA (``get_eva_state_dict``,
``initialize_lora_eva_weights``), over :mod:`adaptc.adapters.loftq` and
:mod:`adaptc.adapters.eva`, with PEFT's arguments, defaults and errors.

Names are PEFT's: module names of a ``PeftModel`` start with ``base_model.model.`` (the
keys of an EVA state dict, the names the layer-input functions get), a ``callback`` gets
the module's name without it. The functions PEFT passes the ``PeftModel`` and its
``LoraConfig`` to get them here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from adaptc.adapters import eva
from adaptc.adapters.loftq import initialize_loftq
from adaptc.api import compile
from adaptc.io.tensors import checkpoint_reader
from adaptc.methods.lora.loftq import LoftqError
from adaptc.methods.lora.spec import EvaSettings
from adaptc.peft.config import LoraConfig, config_of

__all__ = [
    "forward_fn_dict",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
    "replace_lora_weights_loftq",
]

PREFIX = "base_model.model."


def forward_fn_dict(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: Any) -> Any:
    """The positions of the tokens whose layer inputs enter the SVD (PEFT's)."""
    if not isinstance(model_input, dict):
        raise TypeError(
            "When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary"
        )
    return eva.language_modeling_positions(model_input, _settings(peft_config))


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: Any, layer_name: str
) -> torch.Tensor:
    """The layer's inputs at those positions (PEFT's)."""
    return eva.language_modeling_inputs(layer_input, model_input, layer_name)


@torch.no_grad()
def get_eva_state_dict(
    model: Any,
    dataloader: Iterable[Any],
    peft_config: LoraConfig | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = (
        prepare_model_inputs_fn_language_modeling
    ),
    prepare_layer_inputs_fn: Any = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """PEFT's ``get_eva_state_dict``: the SVD components for each layer, by module name.

    ``model`` is a ``PeftModel`` (its config is used), or a plain model with
    ``peft_config``: a compiled copy sharing its weights runs then, the model stays as it is."""
    is_peft_model = hasattr(model, "peft_config")
    if is_peft_model and peft_config is None:
        peft_config = model.peft_config[adapter_name]
    if peft_config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    if is_peft_model:
        compiled, prefix, caller = model.get_base_model(), PREFIX, model
    else:
        compiled = compile(model, peft_config.to_spec(adapter_name))
        prefix, caller = "", compiled
    state = eva.eva_state_dict(
        compiled,
        dataloader,
        adapter=adapter_name,
        forward_fn=_forward(forward_fn, caller),
        prepare_model_inputs_fn=_model_inputs(prepare_model_inputs_fn, peft_config),
        prepare_layer_inputs_fn=_layer_inputs(prepare_layer_inputs_fn, prefix),
        gather_distributed_inputs=gather_distributed_inputs,
        show_progress_bar=show_progress_bar,
    )
    return {prefix + path: tensor for path, tensor in state.items()}


@torch.no_grad()
def initialize_lora_eva_weights(
    model: Any,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: Mapping[str, torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = (
        prepare_model_inputs_fn_language_modeling
    ),
    prepare_layer_inputs_fn: Any = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> None:
    """PEFT's ``initialize_lora_eva_weights``: EVA for the ``PeftModel``'s adapter, in place
    (its ranks, ``A`` and config: targets, ``rank_pattern``, ``alpha_pattern``)."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError(
            "`initialize_lora_eva_weights` currently only works with a single active adapter"
        )
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError(
            "`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`"
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )  # fmt: skip
    compiled = model.get_base_model()
    state = {k.removeprefix(PREFIX): v for k, v in eva_state_dict.items()}
    eva.load_eva_state_dict(compiled, state, adapter=adapter_name)
    old = model.peft_config[adapter_name]
    model.peft_config[adapter_name] = config_of(compiled, adapter_name, old.inference_mode)


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: Any,
    model_path: str | None = None,
    adapter_name: str = "default",
    callback: Callable[[Any, str], bool] | None = None,
) -> dict[str, LoftqError]:
    """PEFT's ``replace_lora_weights_loftq``: LoftQ factors for the LoRA layers of a model
    quantized with bitsandbytes, from the float weights in ``model_path`` (a directory or
    its ``model.safetensors``; when None, the base model's files in the local hub cache).
    A ``callback(peft_model, module_name)`` returning False rolls a layer back. Returns
    each replaced layer's approximation error (PEFT returns None)."""
    if not _has_bnb_4bit():
        raise ValueError("bitsandbytes must be installed and the model must be quantized in 4bits.")
    base = peft_model.get_base_model()
    path = model_path if model_path is not None else _cached_model(peft_model)
    reader = checkpoint_reader(path, prefix=getattr(base, "base_model_prefix", None) or None)
    kept = None
    if callback is not None:
        user = callback

        def kept(_: nn.Module, name: str) -> bool:
            return bool(user(peft_model, name))

    return initialize_loftq(base, reader, adapter=adapter_name, callback=kept)


def _cached_model(peft_model: Any) -> str:
    from huggingface_hub import snapshot_download  # lazily: only without a model_path
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        name = peft_model.base_model.config._name_or_path
        return str(snapshot_download(name, local_files_only=True))
    except (AttributeError, HFValidationError) as exc:
        raise ValueError(
            "The provided model does not appear to be a transformers model or is a local "
            "model. In this case, you must pass the model_path argument that points to the "
            "safetensors file."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ValueError(
            "The model.safetensors file must be present on disk, but it could not be found."
        ) from exc


def _has_bnb_4bit() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _settings(peft_config: Any) -> EvaSettings:
    """The spec's form of the config's ``EvaConfig``."""
    cfg = getattr(peft_config, "eva_config", None)
    if cfg is None:
        return EvaSettings()
    data = cfg if isinstance(cfg, Mapping) else vars(cfg)
    return EvaSettings(**{k: v for k, v in data.items() if k in EvaSettings.model_fields})


def _forward(fn: Callable[[nn.Module, Any], Any] | None, caller: nn.Module) -> Any:
    if fn is None:
        raise ValueError("forward_fn is required")
    return lambda _compiled, inputs: fn(caller, inputs)


def _model_inputs(fn: Callable[[Any, Any], Any] | None, peft_config: Any) -> Any:
    if fn is None:
        return None
    return lambda inputs, _settings: fn(inputs, peft_config)


def _layer_inputs(fn: Any, prefix: str) -> Any:
    """PEFT's layer-input function(s), given PEFT's module names (by PEFT's names too)."""
    if fn is None:
        return None
    if isinstance(fn, Mapping):
        return {k.removeprefix(prefix): _named(v, prefix) for k, v in fn.items()}
    return _named(fn, prefix)


def _named(fn: Any, prefix: str) -> Any:
    if fn is None:
        return None
    return lambda layer_input, model_input, path: fn(layer_input, model_input, prefix + path)
