"""PEFT's ``BOFTConfig`` over adaptc specs (``from adaptc.peft import BOFTConfig``).

The arguments, their order and their defaults are peft 0.21.2's. As in PEFT, a list of
``target_modules``/``exclude_modules`` becomes a set and ``peft_type`` is always BOFT; the
config validates itself on creation (adaptc's one-line errors, naming PEFT's keys): one
of ``boft_block_size`` and ``boft_block_num`` must be non-zero, not both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["BOFTConfig"]


@dataclass
class BOFTConfig(PeftConfig):
    """PEFT's ``BOFTConfig`` (peft 0.21): butterfly orthogonal finetuning.

    Set ``boft_block_size`` (default 4) or ``boft_block_num``, the other to 0.
    ``init_weights=False`` draws random parameters (for tests).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[str] = "BOFT"
    SUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {
            "task_type",
            "peft_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "boft_block_size",
            "boft_block_num",
            "boft_n_butterfly_factor",
            "target_modules",
            "exclude_modules",
            "boft_dropout",
            "fan_in_fan_out",
            "bias",
            "modules_to_save",
            "init_weights",
            "layers_to_transform",
            "layers_pattern",
        }
    )


register_config(BOFTConfig)
