"""PEFT's API over adaptc: change ``from peft import …`` to ``from adaptc.peft import …``.

LoRA only, with PEFT's names, arguments and defaults (``LoraConfig``, ``get_peft_model``,
``PeftModel.from_pretrained``, ``inject_adapter_in_model``, …). The differences are
deliberate and documented in ``docs/peft-migration.md``; the main one: the model passed
in is never changed, a new model is returned. Options adaptc does not implement raise
:class:`NotSupportedError` ("… is not supported by adaptc") instead of being ignored.
This package does not import ``peft``.
"""

from adaptc.peft.config import (
    LoraConfig,
    LoraRuntimeConfig,
    NotSupportedError,
    PeftType,
    TaskType,
    get_peft_config,
)
from adaptc.peft.mapping import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    get_peft_model,
    inject_adapter_in_model,
)
from adaptc.peft.model import PeftModel
from adaptc.peft.tasks import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from adaptc.peft.tuner import LoraModel

PeftConfig = LoraConfig  # the only config adaptc has; `PeftConfig.from_pretrained(dir)` works

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoraConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "NotSupportedError",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
]
