"""PEFT's conventions, as data: default LoRA targets per model type and head names.

Copied from peft 0.21.2 (``peft/utils/constants.py`` and ``peft/peft_model.py``) so that
adaptc resolves targets exactly as PEFT does without importing it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "LORA_TARGET_MODULES",
    "SEQ_CLS_HEAD_NAMES",
    "TASK_MODULES_TO_SAVE",
    "TaskModulesToSave",
]

# ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: ``config.model_type`` -> the
# default ``target_modules``; a tuple is a name list, a string is a regex (``re.fullmatch``).
LORA_TARGET_MODULES: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "falcon": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

# ``SEQ_CLS_HEAD_NAMES``: with ``task_type: SEQ_CLS`` and no output embeddings, the first of
# these top-level attributes is the head that ``all-linear`` leaves out.
SEQ_CLS_HEAD_NAMES: tuple[str, ...] = ("score", "classifier")


class TaskModulesToSave(NamedTuple):
    """Heads a PEFT task model adds to ``modules_to_save``.

    ``guards_targets``: PEFT adds them *before* injecting LoRA (``SEQ_CLS``), so they are
    never LoRA targets; the other task models add them afterwards, so a head selected by
    ``targets`` gets LoRA *and* a trainable copy.
    """

    names: tuple[str, ...]
    guards_targets: bool


# ``PeftModelForSequenceClassification`` / ``…TokenClassification`` / ``…QuestionAnswering``.
TASK_MODULES_TO_SAVE: dict[str, TaskModulesToSave] = {
    "SEQ_CLS": TaskModulesToSave(("classifier", "score"), guards_targets=True),
    "TOKEN_CLS": TaskModulesToSave(("classifier", "score"), guards_targets=False),
    "QUESTION_ANS": TaskModulesToSave(("qa_outputs",), guards_targets=False),
}
