"""PEFT's sub-configurations of ``LoraConfig`` for data- and quantization-aware inits:
``LoftQConfig`` (``loftq_config``) and ``EvaConfig`` (``eva_config``), with PEFT's fields,
defaults and checks. ``LoraConfig`` keeps ``loftq_config`` as a dict and ``eva_config`` as
an ``EvaConfig``, as PEFT does."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["EvaConfig", "LoftQConfig", "normalise_init_configs"]


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: ``loftq_bits`` (4 or 8) and ``loftq_iter`` (alternating steps)."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class EvaConfig:
    """PEFT's ``EvaConfig`` (see the spec's ``eva`` settings for each field)."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")


def normalise_init_configs(config: Any) -> None:
    """What PEFT's ``LoraConfig.__post_init__`` does to ``loftq_config`` and ``eva_config``."""
    if isinstance(config.eva_config, dict):
        names = {f.name for f in fields(EvaConfig)}
        config.eva_config = EvaConfig(**{k: v for k, v in config.eva_config.items() if k in names})
    if config.init_lora_weights == "loftq":
        if not config.loftq_config:
            raise ValueError(
                "`loftq_config` must be specified when `init_lora_weights` is 'loftq'."
            )
        if not isinstance(config.loftq_config, dict):
            config.loftq_config = vars(config.loftq_config)
    elif config.loftq_config:
        config.loftq_config = {}
        warnings.warn(
            "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
            stacklevel=4,
        )
    elif config.init_lora_weights == "eva" and config.eva_config is None:
        warnings.warn(
            "`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA "
            "config.",
            stacklevel=4,
        )
        config.eva_config = EvaConfig()
    elif config.init_lora_weights != "eva" and config.eva_config is not None:
        warnings.warn(
            "`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.",
            stacklevel=4,
        )
