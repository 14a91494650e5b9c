"""PEFT's ``OFTConfig`` over adaptc specs (``from adaptc.peft import OFTConfig``).

The arguments, their order and their defaults are peft 0.21.2's. As in PEFT, a list of
``target_modules``/``exclude_modules`` becomes a set and ``peft_type`` is always OFT; the
config validates itself on creation (adaptc's one-line errors, naming PEFT's keys): one
of ``r`` and ``oft_block_size`` must be non-zero, not both. adaptc implements every
``OFTConfig`` argument (``module_dropout`` is kept and, as in peft 0.21.2, has no effect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["OFTConfig"]


@dataclass
class OFTConfig(PeftConfig):
    """PEFT's ``OFTConfig`` (peft 0.21): orthogonal finetuning.

    Set ``oft_block_size`` (default 32) or ``r`` (the number of blocks), the other to 0.
    ``init_weights=False`` draws the parameters from a normal with std 0.1 (for tests).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    PEFT_TYPE: ClassVar[str] = "OFT"
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
            "oft_block_size",
            "module_dropout",
            "target_modules",
            "fan_in_fan_out",
            "bias",
            "exclude_modules",
            "init_weights",
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
            "coft",
            "eps",
            "block_share",
            "use_cayley_neumann",
            "num_cayley_neumann_terms",
        }
    )


register_config(OFTConfig)
