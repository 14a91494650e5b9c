"""PEFT's ``VeraConfig`` over adaptc specs (``from adaptc.peft import VeraConfig``).

The arguments, their order and their defaults are peft 0.21.2's. As in PEFT, a list of
``target_modules`` becomes a set and ``peft_type`` is always VERA. The config validates
itself on creation (adaptc's one-line errors, naming PEFT's keys). adaptc implements
every ``VeraConfig`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["VeraConfig"]


@dataclass
class VeraConfig(PeftConfig):
    """PEFT's ``VeraConfig`` (peft 0.21): shared random projections, trained vectors.

    ``projection_prng_key`` seeds the shared ``vera_A``/``vera_B``; ``save_projection``
    writes them into the adapter file. ``init_weights=False`` starts ``b`` at ones and
    ``d`` from a standard normal (for tests).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 256
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[str] = "VERA"
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
            "projection_prng_key",
            "save_projection",
            "vera_dropout",
            "d_initial",
            "fan_in_fan_out",
            "bias",
            "modules_to_save",
            "init_weights",
            "layers_to_transform",
            "layers_pattern",
        }
    )


register_config(VeraConfig)
