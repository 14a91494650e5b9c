"""PEFT's ``IA3Config`` over adaptc specs (``from adaptc.peft import IA3Config``).

The arguments, their order and their defaults are peft 0.21.2's. As in PEFT, a list of
``target_modules``/``exclude_modules``/``feedforward_modules`` becomes a set, ``peft_type``
is always IA3, and ``feedforward_modules`` must be a subset of ``target_modules`` when
both are lists. The config validates itself on creation (adaptc's one-line errors, naming
PEFT's keys). adaptc implements every ``IA3Config`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["IA3Config"]


@dataclass
class IA3Config(PeftConfig):
    """PEFT's ``IA3Config`` (peft 0.21): (IA)³ scaling vectors.

    ``feedforward_modules`` (a subset of ``target_modules``) get their input scaled, the
    other targets their output; omitted, both take PEFT's defaults for the model type.
    ``init_ia3_weights=False`` draws the vectors from a standard normal (for tests).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    feedforward_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    PEFT_TYPE: ClassVar[str] = "IA3"
    SUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {
            "task_type",
            "peft_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "target_modules",
            "exclude_modules",
            "feedforward_modules",
            "fan_in_fan_out",
            "modules_to_save",
            "init_ia3_weights",
        }
    )


register_config(IA3Config)
