"""PEFT's ``LoKrConfig`` over adaptc specs (``from adaptc.peft import LoKrConfig``).

The arguments, their order and their defaults are peft 0.21.2's. As in PEFT, a list of
``target_modules``/``exclude_modules`` becomes a set and ``peft_type`` is always LOKR.
The config validates itself on creation (adaptc's one-line errors, naming PEFT's keys).
adaptc implements every ``LoKrConfig`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["LoKrConfig"]


@dataclass
class LoKrConfig(PeftConfig):
    """PEFT's ``LoKrConfig`` (peft 0.21): a low-rank Kronecker product update.

    ``ΔW = (alpha/r)·kron(w1, w2)``; ``decompose_both`` also factors ``w1``,
    ``use_effective_conv2d`` factors a convolution's ``w2`` through a core tensor.
    ``init_weights`` is True (``w1`` zeros), ``"lycoris"`` (``w2`` zeros) or False (random).
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
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[str] = "LOKR"
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
            "decompose_both",
            "decompose_factor",
            "rank_dropout_scale",
            "target_modules",
            "exclude_modules",
            "init_weights",
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
        }
    )


register_config(LoKrConfig)
