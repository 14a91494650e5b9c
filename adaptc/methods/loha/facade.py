"""PEFT's ``LoHaConfig`` over adaptc specs (``from adaptc.peft import LoHaConfig``).

The arguments, their order and their defaults are peft 0.21.2's. As in PEFT, a list of
``target_modules``/``exclude_modules`` becomes a set and ``peft_type`` is always LOHA.
The config validates itself on creation (adaptc's one-line errors, naming PEFT's keys).
adaptc implements every ``LoHaConfig`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["LoHaConfig"]


@dataclass
class LoHaConfig(PeftConfig):
    """PEFT's ``LoHaConfig`` (peft 0.21): a low-rank Hadamard product update.

    ``ΔW = (alpha/r)·(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; ``use_effective_conv2d`` rebuilds a
    convolution's factors from core tensors. ``init_weights`` True (``w2_b`` zeros) or False
    (random).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[str] = "LOHA"
    SUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {
            "task_type",
            "peft_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "rank_pattern",
            "alpha_pattern",
            "r",
            "alpha",
            "rank_dropout",
            "module_dropout",
            "use_effective_conv2d",
            "target_modules",
            "exclude_modules",
            "init_weights",
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
        }
    )


register_config(LoHaConfig)
