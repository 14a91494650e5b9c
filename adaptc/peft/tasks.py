"""PEFT's task models (``PeftModelForCausalLM``, …): ``PeftModel`` with PEFT's forward
arguments, so tools that read the signature (``transformers.Trainer``) keep their columns.
"""

from __future__ import annotations

from typing import Any

from adaptc.peft.forward import special_forward
from adaptc.peft.model import PeftModel
from adaptc.peft.tuner import unsupported

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]


def _call(model: PeftModel, arguments: dict[str, Any]) -> Any:
    """Call the adapted model with a task forward's arguments: those given, then ``kwargs``."""
    kwargs = arguments.pop("kwargs")
    arguments.pop("self")
    if arguments.pop("task_ids") is not None:
        raise unsupported("task_ids", "...", " (prompt learning only)")
    named = {k: v for k, v in arguments.items() if v is not None}
    base = model.get_base_model()
    first = named.get("input_ids", named.get("inputs_embeds"))
    with special_forward(base, kwargs, first):
        return base(**named, **kwargs)


class PeftModelForCausalLM(PeftModel):
    """PEFT's model for ``task_type=CAUSAL_LM``."""

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        inputs_embeds: Any = None,
        labels: Any = None,
        output_attentions: Any = None,
        output_hidden_states: Any = None,
        return_dict: Any = None,
        task_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
        return _call(self, locals())


class PeftModelForSeq2SeqLM(PeftModel):
    """PEFT's model for ``task_type=SEQ_2_SEQ_LM``."""

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        inputs_embeds: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        decoder_inputs_embeds: Any = None,
        labels: Any = None,
        output_attentions: Any = None,
        output_hidden_states: Any = None,
        return_dict: Any = None,
        task_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
        return _call(self, locals())


class PeftModelForSequenceClassification(PeftModel):
    """PEFT's model for ``task_type=SEQ_CLS`` (the head is in ``modules_to_save``)."""

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        inputs_embeds: Any = None,
        labels: Any = None,
        output_attentions: Any = None,
        output_hidden_states: Any = None,
        return_dict: Any = None,
        task_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
        return _call(self, locals())


class PeftModelForTokenClassification(PeftModel):
    """PEFT's model for ``task_type=TOKEN_CLS`` (the head is in ``modules_to_save``)."""

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        inputs_embeds: Any = None,
        labels: Any = None,
        output_attentions: Any = None,
        output_hidden_states: Any = None,
        return_dict: Any = None,
        task_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
        return _call(self, locals())


class PeftModelForQuestionAnswering(PeftModel):
    """PEFT's model for ``task_type=QUESTION_ANS``."""

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        inputs_embeds: Any = None,
        start_positions: Any = None,
        end_positions: Any = None,
        output_attentions: Any = None,
        output_hidden_states: Any = None,
        return_dict: Any = None,
        task_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
        return _call(self, locals())


class PeftModelForFeatureExtraction(PeftModel):
    """PEFT's model for ``task_type=FEATURE_EXTRACTION``."""

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        inputs_embeds: Any = None,
        output_attentions: Any = None,
        output_hidden_states: Any = None,
        return_dict: Any = None,
        task_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
        return _call(self, locals())


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}
PeftModel.task_classes.update(MODEL_TYPE_TO_PEFT_MODEL_MAPPING)
