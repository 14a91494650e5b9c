"""PEFT's ``add_weighted_adapter`` for the facade, over :func:`adaptc.adapters.combine_adapters`.

The combination itself is adaptc's (in place on the adapted model, so the other adapters'
parameters stay the same objects); this module adds PEFT's bookkeeping: an existing name
is silently ignored, and ``peft_config[adapter_name]`` is the first adapter's config with
the new ``r``, ``lora_alpha = r``, the united ``target_modules`` and no patterns.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from adaptc.adapters.combine import CombinationType, combine_adapters
from adaptc.peft.config import config_of

__all__ = ["add_weighted_adapter"]


def add_weighted_adapter(
    peft_model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: CombinationType | str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] | str = "total",
) -> None:
    """PEFT's ``LoraModel.add_weighted_adapter`` on a ``PeftModel`` or ``LoraModel``.

    As in PEFT the new adapter is inactive (``set_adapter`` activates it) and frozen, and
    nothing happens when ``adapter_name`` already exists.
    """
    lora: Any = peft_model.base_model if hasattr(peft_model, "get_base_model") else peft_model
    if not hasattr(lora, "peft_config") or not isinstance(getattr(lora, "model", None), nn.Module):
        raise TypeError(f"expected a PeftModel or LoraModel, got {type(peft_model).__name__}")
    if adapter_name in lora.peft_config:
        return
    for adapter in adapters:
        if adapter not in lora.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
    combine_adapters(
        lora.model,
        adapters,
        weights,
        adapter_name,
        combination_type,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
        density=density,
        majority_sign_method=majority_sign_method,
    )
    first = lora.peft_config[adapters[0]]
    made = config_of(lora.model, adapter_name, inference_mode=first.inference_mode)
    lora.peft_config[adapter_name] = dataclasses.replace(
        first,
        r=made.r,
        lora_alpha=made.r,
        target_modules=made.target_modules,
        alpha_pattern={},
        rank_pattern={},
    )
