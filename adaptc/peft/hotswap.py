"""PEFT's ``peft.utils.hotswap`` over adaptc: ``hotswap_adapter`` and its preparation.

``from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap``
becomes ``from adaptc.peft.hotswap import …``; both take the facade's ``PeftModel`` (or
``torch.compile`` of it) and call :func:`adaptc.hotswap` / :func:`adaptc.prepare_hotswap`
on its adapted model. Differences from PEFT (``docs/hotswap.md``): a new adapter may differ
from the old one in ``use_rslora`` and ``alpha_pattern`` too (the scalings are swapped);
a layer the new adapter does not target gets a zero update, also under DoRA; saving
afterwards writes the new adapter at its true rank.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

from torch import nn

from adaptc.adapters.hotswap import prepare_hotswap
from adaptc.compiler import compiled_info
from adaptc.io.swap import hotswap
from adaptc.methods.lora.branch import LoraBranch
from adaptc.peft.config import LoraConfig
from adaptc.peft.model import PeftModel, adapter_directory
from adaptc.peft.tuner import LoraModel, config_of

__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Replace adapter ``adapter_name`` of ``model`` with the one saved at
    ``model_name_or_path``, in place and without recompiling a ``torch.compile``'d model.

    ``torch_device`` is accepted and changes nothing: the new weights go where the old ones
    are (PEFT moves them there too). ``subfolder``, ``revision`` and ``cache_dir`` are read.
    """
    del torch_device
    peft_model = _peft_model(model)
    kwargs.pop("low_cpu_mem_usage", None)  # peft's hotswap does not take it either
    directory = adapter_directory(model_name_or_path, kwargs)
    adapted = _adapted(peft_model)
    hotswap(adapted, directory, adapter_name)
    configs = _configs(peft_model)
    if configs is not None and adapter_name in configs:
        old = configs[adapter_name]
        configs[adapter_name] = config_of(adapted, adapter_name, old.inference_mode)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] | bool = "error",
) -> None:
    """Prepare ``model`` (loaded, not yet compiled) for hotswapping adapters of other ranks
    (up to ``target_rank``) and scalings without recompiling. As in PEFT, the ranks in
    ``config`` (if given, with ``target_rank``) are set to ``target_rank``; ``check_compiled``
    says what to do when ``model`` is already compiled (``True`` means ``"error"``).
    """
    mode: str
    if isinstance(check_compiled, bool):
        mode = "error" if check_compiled else "ignore"
    else:
        mode = check_compiled
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if mode == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if mode == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already "
                "compiled. This will likely result in re-compilation, hurting performance. Call "
                "the function before compiling the model.",
                stacklevel=2,
            )
        elif mode != "ignore":
            raise ValueError(
                f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{mode}' "
                "instead."
            )
    adapted = _adapted(_peft_model(model))
    if compiled_info(adapted) is None or not any(
        isinstance(m, LoraBranch) for m in adapted.modules()
    ):
        raise ValueError(
            "No adapter layers found on the model, make sure call "
            "`prepare_model_for_compiled_hotswap` after loading the first adapter and before "
            "loading the second adapter."
        )
    prepare_hotswap(adapted, max_rank=target_rank)
    if not config or target_rank is None:
        return
    for lora_config in (config if isinstance(config, dict) else {"": config}).values():
        lora_config.r = target_rank
        for key in lora_config.rank_pattern:
            lora_config.rank_pattern[key] = target_rank


def _peft_model(model: nn.Module) -> nn.Module:
    """The facade's model, unwrapped from ``torch.compile``'s wrapper."""
    inner = getattr(model, "_orig_mod", model)
    assert isinstance(inner, nn.Module)
    return inner


def _adapted(model: nn.Module) -> nn.Module:
    """The adaptc-compiled model inside a ``PeftModel``/``LoraModel`` (or ``model`` itself)."""
    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, LoraModel):
        inner = model.model
        assert isinstance(inner, nn.Module)
        return inner
    return model


def _configs(model: nn.Module) -> dict[str, LoraConfig] | None:
    configs = getattr(model, "peft_config", None)
    return configs if isinstance(configs, dict) else None
