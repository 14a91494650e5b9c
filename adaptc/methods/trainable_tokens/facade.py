"""PEFT's ``TrainableTokensConfig`` over adaptc specs (``from adaptc.peft import
TrainableTokensConfig``).

The arguments, their order and their defaults are peft 0.21.2's; ``peft_type`` is always
TRAINABLE_TOKENS. The config validates itself on creation (adaptc's one-line errors,
naming PEFT's keys). adaptc implements every ``TrainableTokensConfig`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["TrainableTokensConfig"]


@dataclass
class TrainableTokensConfig(PeftConfig):
    """PEFT's ``TrainableTokensConfig`` (peft 0.21): train the embedding rows of
    ``token_indices`` and nothing else.

    ``target_modules`` omitted: the model's input embedding; an output head tied to it
    (``tie_word_embeddings``) reads the same rows. ``init_weights=False`` starts the rows
    from a standard normal instead of the embedding's own (for tests).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        listed = self.target_modules
        super().__post_init__()
        self.target_modules = listed  # PEFT keeps this config's list a list (not a set)

    PEFT_TYPE: ClassVar[str] = "TRAINABLE_TOKENS"
    SUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {
            "task_type",
            "peft_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "token_indices",
            "target_modules",
            "init_weights",
        }
    )


register_config(TrainableTokensConfig)
