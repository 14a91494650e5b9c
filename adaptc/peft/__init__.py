"""PEFT's API over adaptc: change ``from peft import …`` to ``from adaptc.peft import …``.

PEFT's names, arguments and defaults (``LoraConfig``, ``get_peft_model``,
``PeftModel.from_pretrained``, ``inject_adapter_in_model``, …), for LoRA and the other
methods adaptc registers (each method's config class, such as ``IA3Config``, comes from
its package's ``facade`` module). The differences are
deliberate and documented in ``docs/peft-migration.md``; the main one: the model passed
in is never changed, a new model is returned. Options adaptc does not implement raise
:class:`NotSupportedError` ("… is not supported by adaptc") instead of being ignored.
This package does not import ``peft``.
"""

import importlib
import importlib.util

from adaptc.methods import NAMES
from adaptc.methods.prompt_tuning.facade import PromptTuningInit
from adaptc.peft.config import (
    CONFIG_CLASSES,
    LoraConfig,
    LoraRuntimeConfig,
    NoMatchingPeftModuleError,
    NotSupportedError,
    PeftConfig,
    PeftError,
    PeftType,
    PeftWarning,
    TaskType,
    get_peft_config,
)
from adaptc.peft.init_configs import EvaConfig, LoftQConfig
from adaptc.peft.lora_init import (
    get_eva_state_dict,
    initialize_lora_eva_weights,
    replace_lora_weights_loftq,
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
from adaptc.peft.precision import cast_mixed_precision_params, prepare_model_for_kbit_training
from adaptc.peft.state import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from adaptc.peft.status import (
    TunerLayerStatus,
    TunerModelStatus,
    get_layer_status,
    get_model_status,
)
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

for _name in NAMES:  # each method's config class registers itself when its facade loads
    if importlib.util.find_spec(f"adaptc.methods.{_name}.facade") is not None:
        importlib.import_module(f"adaptc.methods.{_name}.facade")
_CONFIGS = {cls.__name__: cls for cls in CONFIG_CLASSES.values()}  # LoraConfig, IA3Config, …
globals().update(_CONFIGS)
PEFT_TYPE_TO_CONFIG_MAPPING = {PeftType(k): v for k, v in CONFIG_CLASSES.items()}

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "NoMatchingPeftModuleError",
    "NotSupportedError",
    "PeftConfig",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PromptTuningInit",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    *sorted(set(_CONFIGS) - {"LoraConfig"}),
]
