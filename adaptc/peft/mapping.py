"""PEFT's entry points: ``get_peft_model``, ``inject_adapter_in_model``, ``AutoPeftModel*``.

Deliberate difference from PEFT: the model passed in is never changed. PEFT injects LoRA
layers into it and returns it (wrapped); adaptc returns a *new* model that shares its
frozen weights, so keep using the returned model (``model = get_peft_model(model, cfg)``,
as PEFT's examples already do).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, ClassVar

from torch import nn

from adaptc.io import resolve_adapter_dir
from adaptc.models import AUTO_CLASSES
from adaptc.peft.config import LoraConfig, config_class, read_config
from adaptc.peft.model import PeftModel
from adaptc.peft.tasks import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from adaptc.peft.tuner import compile_config, freeze, unsupported

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "get_peft_model",
    "inject_adapter_in_model",
]


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """A ``PeftModel`` around a *new* adapted model; ``model`` is left untouched.

    The class follows ``peft_config.task_type`` as in PEFT (``PeftModelForCausalLM``, …).
    ``peft_config`` is not changed either: the returned model holds a copy with
    ``base_model_name_or_path`` (and ``revision``) filled in.
    """
    if mixed:
        raise unsupported("mixed", True, " (adaptc adapters are all LoRA)")
    config = copy.deepcopy(peft_config)
    old_name = config.base_model_name_or_path
    new_name = model.__dict__.get("name_or_path", None) or None
    config.base_model_name_or_path = new_name
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to "
            f"'{new_name}'. Please ensure that the correct base model is loaded when loading "
            "this checkpoint.",
            UserWarning,
            stacklevel=2,
        )
    if revision is not None:
        config.revision = revision
    task = config.task_name
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel) if task else PeftModel
    return cls(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """The adapted model itself (no ``PeftModel`` wrapper): a *new* model.

    PEFT returns the model passed in, changed in place; adaptc leaves it untouched, so use
    the returned model (``model = inject_adapter_in_model(cfg, model)``).
    """
    del low_cpu_mem_usage  # changes nothing: adapter weights are created initialised
    if state_dict is not None:
        raise unsupported("state_dict", "{...}", " (name the targets in the config)")
    new = compile_config(model, peft_config, adapter_name)
    if peft_config.inference_mode:
        freeze(new)
    return new


class AutoPeftModel:
    """PEFT's ``AutoPeftModel*.from_pretrained(adapter_dir)``: the base model named in the
    adapter's ``base_model_name_or_path`` (a local directory, or a hub id already in the
    cache: adaptc never downloads), then ``PeftModel.from_pretrained`` on it."""

    _target_class: ClassVar[str] = "AutoModel"
    _peft_model_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is not meant to be instantiated: use from_pretrained")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Any = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        import transformers

        if config is not None:
            raise unsupported("config", config)
        directory = resolve_adapter_dir(  # the hub keywords serve the base model too
            pretrained_model_name_or_path, revision=revision, cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"), local_files_only=kwargs.get("local_files_only", False),
        )  # fmt: skip
        data = read_config(directory)
        peft_config = config_class(data).from_dict(data)
        base_name = peft_config.base_model_name_or_path
        if not base_name:
            raise ValueError(f"{directory}/adapter_config.json names no base_model_name_or_path")
        auto = getattr(transformers, cls._target_class)
        base = auto.from_pretrained(base_name, revision=peft_config.revision, **kwargs)
        return cls._peft_model_class.from_pretrained(
            base, directory, adapter_name=adapter_name, is_trainable=is_trainable
        )


class AutoPeftModelForCausalLM(AutoPeftModel):
    _target_class = AUTO_CLASSES["CAUSAL_LM"]
    _peft_model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING["CAUSAL_LM"]


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    _target_class = AUTO_CLASSES["SEQ_2_SEQ_LM"]
    _peft_model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING["SEQ_2_SEQ_LM"]


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    _target_class = AUTO_CLASSES["SEQ_CLS"]
    _peft_model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING["SEQ_CLS"]


class AutoPeftModelForTokenClassification(AutoPeftModel):
    _target_class = AUTO_CLASSES["TOKEN_CLS"]
    _peft_model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING["TOKEN_CLS"]


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    _target_class = AUTO_CLASSES["QUESTION_ANS"]
    _peft_model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING["QUESTION_ANS"]


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    _target_class = AUTO_CLASSES["FEATURE_EXTRACTION"]
    _peft_model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING["FEATURE_EXTRACTION"]
