"""PEFT's conventions, as data: task heads (each method has its default targets).

Copied from peft 0.21.2 (``peft/utils/constants.py`` and ``peft/peft_model.py``) so that
adaptc resolves targets exactly as PEFT does without importing it.
"""

from __future__ import annotations

from typing import NamedTuple

from adaptc.methods.lora.targets import LORA_TARGET_MODULES

__all__ = [
    "LORA_TARGET_MODULES",
    "SEQ_CLS_HEAD_NAMES",
    "TASK_MODULES_TO_SAVE",
    "TaskModulesToSave",
]

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
