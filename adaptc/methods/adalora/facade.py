"""PEFT's ``AdaLoraConfig`` over adaptc specs (``from adaptc.peft import AdaLoraConfig``).

The arguments, their order and their defaults are peft 0.21.2's (``LoraConfig``'s, then
AdaLoRA's). As in PEFT, ``total_step`` is required, a list of ``target_modules`` /
``exclude_modules`` becomes a set and ``peft_type`` is always ADALORA. The config
validates itself on creation (adaptc's one-line errors, naming PEFT's keys). The LoRA
options AdaLoRA has no use for (DoRA, LoftQ, rsLoRA, …) are refused when set; ``r`` is
ignored, as PEFT ignores it (``init_r`` is the initial rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["AdaLoraConfig"]


@dataclass
class AdaLoraConfig(PeftConfig):
    """PEFT's ``AdaLoraConfig`` (peft 0.21): SVD-form LoRA with adaptive ranks.

    Train with ``adaptc.integrations.AdaLoraCallback`` in a ``Trainer``, or call
    ``adaptc.integrations.update_and_allocate(model, step)`` after each optimizer step.
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, Any] | None = None
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    megatron_config: Any = None
    megatron_core: Any = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: Any = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    lora_bias: bool = False
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    SUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {
            "task_type",
            "peft_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "r",
            "target_modules",
            "exclude_modules",
            "lora_alpha",
            "lora_dropout",
            "fan_in_fan_out",
            "modules_to_save",
            "init_lora_weights",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "target_r",
            "init_r",
            "tinit",
            "tfinal",
            "deltaT",
            "beta1",
            "beta2",
            "orth_reg_weight",
            "total_step",
        }
    )


register_config(AdaLoraConfig)
