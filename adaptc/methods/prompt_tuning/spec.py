"""Prompt tuning in the spec: the adapter's settings and PEFT's ``PromptTuningConfig`` both
ways.

PEFT's ``prompt_tuning_init`` RANDOM / TEXT / SAMPLE_VOCAB becomes ``init: random`` /
``text`` / ``sample_vocab``, ``prompt_tuning_init_text`` ``init_text`` and
``tokenizer_name_or_path`` ``tokenizer``. ``num_attention_heads`` and ``num_layers`` are
recorded only (PEFT writes them; prompt tuning does not use them). PEFT's
``modules_to_save`` is refused by name, as is any option the config does not have.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictStr, model_validator

from adaptc.spec.fields import FieldError, LayerSelection, PositiveInt, Targets, closed
from adaptc.spec.method import PEFT_FORMAT_VERSION, Bad, MethodSpec

__all__ = ["INITS", "SPEC", "PromptTuningAdapter"]

INITS = {"RANDOM": "random", "TEXT": "text", "SAMPLE_VOCAB": "sample_vocab"}  # PEFT -> spec


class PromptTuningAdapter(BaseModel):
    """Prompt tuning: ``num_virtual_tokens`` trained embedding vectors go before the
    embedded input of every sequence; the model itself stays frozen."""

    model_config = closed("PromptTuningAdapter")

    method: Literal["prompt_tuning"] = Field(
        description="Adapter method `prompt_tuning`: learned virtual tokens prepended to the "
        "input embeddings (PEFT `PromptTuningConfig`)."
    )
    num_virtual_tokens: PositiveInt = Field(
        description="How many virtual tokens go before the input (PEFT `num_virtual_tokens`)."
    )
    token_dim: PositiveInt | None = Field(
        default=None,
        description="The virtual tokens' size; omitted: the input embedding's dimension, "
        "which it must equal (PEFT `token_dim`).",
    )
    num_transformer_submodules: Literal[1, 2] | None = Field(
        default=None,
        description="Sets of virtual tokens: 1 for a decoder-only model (2, encoder and "
        "decoder, is PEFT's for seq2seq models and not supported by adaptc yet). Omitted: 1 "
        "(PEFT `num_transformer_submodules`).",
    )
    num_attention_heads: PositiveInt | None = Field(
        default=None,
        description="Recorded only: PEFT writes the model's number of attention heads here; "
        "prompt tuning does not use it (PEFT `num_attention_heads`).",
    )
    num_layers: PositiveInt | None = Field(
        default=None,
        description="Recorded only: PEFT writes the model's number of layers here; prompt "
        "tuning does not use it (PEFT `num_layers`).",
    )
    init: Literal["random", "text", "sample_vocab"] = Field(
        default="random",
        description="The virtual tokens' initial values: `random` (standard normal), `text` "
        "(the embeddings of `init_text`'s tokens, repeated or cut to the number of virtual "
        "tokens) or `sample_vocab` (the embeddings of tokens drawn uniformly from the "
        "vocabulary). PEFT `prompt_tuning_init` RANDOM / TEXT / SAMPLE_VOCAB.",
    )
    init_text: StrictStr | None = Field(
        default=None,
        description="With `init: text`: the text whose tokens start the virtual tokens "
        "(PEFT `prompt_tuning_init_text`).",
    )
    tokenizer: StrictStr | None = Field(
        default=None,
        description="With `init: text`: the tokenizer (a hub name or a local directory) that "
        "splits `init_text` (PEFT `tokenizer_name_or_path`).",
    )
    tokenizer_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="With `init: text`: keyword arguments for `AutoTokenizer.from_pretrained` "
        "(`trust_remote_code` is dropped, as PEFT does) (PEFT `tokenizer_kwargs`).",
    )
    targets: Targets | None = Field(
        default=None,
        description="The input embedding that embeds the real tokens; omitted: the model's "
        "`get_input_embeddings()`, as PEFT takes it.",
    )

    @model_validator(mode="after")
    def _text_init(self) -> PromptTuningAdapter:
        if self.init == "text":
            if self.tokenizer is None:
                raise FieldError(("tokenizer",), "init 'text' needs a tokenizer")
            if self.init_text is None:
                raise FieldError(("init_text",), "init 'text' needs init_text")
        elif self.tokenizer_kwargs:
            raise FieldError(("tokenizer_kwargs",), "tokenizer_kwargs is only for init 'text'")
        return self

    # the selection fields every method's target resolution reads
    @property
    def exclude(self) -> None:
        return None

    @property
    def layers(self) -> LayerSelection | None:
        return None

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        return ()


# PromptTuningConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "PROMPT_TUNING",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "num_virtual_tokens": None,
    "token_dim": None,
    "num_transformer_submodules": None,
    "num_attention_heads": None,
    "num_layers": None,
    "modules_to_save": None,
    "prompt_tuning_init": "RANDOM",
    "prompt_tuning_init_text": None,
    "tokenizer_name_or_path": None,
    "tokenizer_kwargs": None,
}
_ENVELOPE = {"peft_type", "peft_version", "auto_mapping", "inference_mode", "task_type"}
_ENVELOPE |= {"base_model_name_or_path", "revision"}
_SAME: tuple[str, ...] = ("num_virtual_tokens", "token_dim", "num_transformer_submodules")
_SAME += ("num_attention_heads", "num_layers", "tokenizer_kwargs")
_RENAMED = {
    "prompt_tuning_init_text": "init_text",
    "tokenizer_name_or_path": "tokenizer",
}


def to_peft(a: PromptTuningAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``PromptTuningConfig`` for ``a``, in its key order."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    for key in _SAME:
        cfg[key] = copy.deepcopy(getattr(a, key))
    for key, name in _RENAMED.items():
        cfg[key] = getattr(a, name)
    cfg["prompt_tuning_init"] = {v: k for k, v in INITS.items()}[a.init]
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``PromptTuningConfig``."""
    adapter: dict[str, Any] = {"method": "prompt_tuning"}
    for key, value in cfg.items():
        if key in _ENVELOPE:
            continue
        if key in _SAME:
            if value is not None:
                adapter[key] = value
        elif key in _RENAMED:
            if value is not None:
                adapter[_RENAMED[key]] = value
        elif key == "prompt_tuning_init":
            plain = getattr(value, "value", value)
            if plain in INITS:
                adapter["init"] = INITS[plain]
            else:
                bad(key, f"prompt_tuning_init={plain!r} is not one of {', '.join(INITS)}")
        elif key == "modules_to_save":
            if value:
                bad(key, "modules_to_save is not supported by adaptc for prompt tuning")
        elif value not in (None, False, {}, [], ""):
            bad(key, f"{key!r} is not a PromptTuningConfig option")
    return adapter


SPEC = MethodSpec(
    name="prompt_tuning",
    model=PromptTuningAdapter,
    peft_type="PROMPT_TUNING",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        "init": "prompt_tuning_init",
        "init_text": "prompt_tuning_init_text",
        "tokenizer": "tokenizer_name_or_path",
    },
    peft_has_layers=False,
)
