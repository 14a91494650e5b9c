"""PEFT's ``PromptTuningConfig`` over adaptc specs (``from adaptc.peft import
PromptTuningConfig``), and its ``PromptTuningInit``.

The arguments, their order and their defaults are peft 0.21.2's; ``peft_type`` is always
PROMPT_TUNING. The config validates itself on creation (adaptc's one-line errors, naming
PEFT's keys). ``modules_to_save`` and seq2seq models (``num_transformer_submodules=2``) are
not supported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from adaptc.peft.config import PeftConfig, PeftType, TaskType, register_config

__all__ = ["PromptTuningConfig", "PromptTuningInit"]


class PromptTuningInit(str, enum.Enum):
    """PEFT's ``PromptTuningInit``: how the virtual tokens start."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PeftConfig):
    """PEFT's ``PromptTuningConfig`` (peft 0.21): ``num_virtual_tokens`` learned embeddings
    before the input. ``prompt_tuning_init`` TEXT needs ``prompt_tuning_init_text`` and
    ``tokenizer_name_or_path``."""

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"
    SUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {
            "task_type",
            "peft_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "prompt_tuning_init",
            "prompt_tuning_init_text",
            "tokenizer_name_or_path",
            "tokenizer_kwargs",
        }
    )

    @property
    def is_prompt_learning(self) -> bool:
        return True


register_config(PromptTuningConfig)
