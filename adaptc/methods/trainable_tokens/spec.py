"""Trainable tokens in the spec: the adapter's settings and PEFT's ``TrainableTokensConfig``
both ways.

``token_indices`` is PEFT's list; ``init_weights`` True/False becomes ``init: copy`` /
``random``. ``targets`` is the shared selector (omitted: the model's input embedding, as
PEFT fills ``target_modules``). PEFT's ``TrainableTokensConfig`` has no
``exclude_modules``, ``layers_to_transform`` or ``modules_to_save``, and neither has this
model; any other option is refused by name instead of being dropped.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from adaptc.spec.fields import FieldError, LayerSelection, Targets, TokenIndices, closed
from adaptc.spec.method import PEFT_FORMAT_VERSION, Bad, MethodSpec
from adaptc.spec.peft_targets import selection_from_peft, selection_to_peft

__all__ = ["SPEC", "TrainableTokensAdapter"]


class TrainableTokensAdapter(BaseModel):
    """Trainable tokens: the embedding rows of ``token_indices`` train, the others stay
    frozen; ``embed(x)`` reads a listed token's row from the adapter, any other token's
    from the frozen weight."""

    model_config = closed("TrainableTokensAdapter")

    method: Literal["trainable_tokens"] = Field(
        description="Adapter method `trainable_tokens`: train a few rows of an embedding "
        "(PEFT `TrainableTokensConfig`)."
    )
    token_indices: TokenIndices = Field(
        description="The token ids whose rows train, e.g. the ids of tokens added to the "
        "tokenizer; each at most once, and below the embedding's number of rows (PEFT "
        "`token_indices`)."
    )
    targets: Targets | None = Field(
        default=None,
        description="The embedding layers whose rows train (the shared selectors; an "
        "`nn.Linear` output head works too, its rows being the tokens' logits). When "
        "omitted, the model's input embedding (`get_input_embeddings()`), else a top-level "
        "module named `embed_tokens`, as PEFT does. An output head tied to the input "
        "embedding (`tie_word_embeddings`) follows it: it reads the same trained rows.",
    )
    init: Literal["copy", "random"] = Field(
        default="copy",
        description="The rows' initial values: `copy` (the embedding's own rows, so the "
        "adapter starts as a no-op) or `random` (standard normal; for tests). PEFT "
        "`init_weights` true/false.",
    )

    @model_validator(mode="after")
    def _selects_modules(self) -> TrainableTokensAdapter:
        if getattr(self.targets, "kind", None) == "none":
            raise FieldError(("targets", "kind"), "targets kind 'none' selects nothing")
        return self

    # the selection fields PEFT's TrainableTokensConfig does not have (as every method's
    # target resolution reads them)
    @property
    def exclude(self) -> None:
        return None

    @property
    def layers(self) -> LayerSelection | None:
        return None

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        return ()


# TrainableTokensConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "TRAINABLE_TOKENS",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "token_indices": [],
    "target_modules": None,
    "init_weights": True,
}
_ENVELOPE = {"peft_type", "peft_version", "auto_mapping", "inference_mode", "task_type"}
_ENVELOPE |= {"base_model_name_or_path", "revision"}


def to_peft(a: TrainableTokensAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``TrainableTokensConfig`` for ``a``, in its key order.

    With ``targets`` omitted and the resolved path given, ``target_modules`` is that path
    as a string, as PEFT records the input embedding it found (``"model.embed_tokens"``)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    cfg["token_indices"] = list(a.token_indices)
    if a.targets is None and target_modules is not None and len(target_modules) == 1:
        cfg["target_modules"] = target_modules[0]
    else:
        cfg["target_modules"] = selection_to_peft(a, target_modules).get("target_modules")
    cfg["init_weights"] = a.init == "copy"
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``TrainableTokensConfig``."""
    adapter: dict[str, Any] = {"method": "trainable_tokens"}
    selection_from_peft({"target_modules": cfg.get("target_modules")}, adapter)
    for key, value in cfg.items():
        if key in _ENVELOPE or key == "target_modules":
            continue
        if key == "token_indices":
            adapter["token_indices"] = value
        elif key == "init_weights":
            if value is False:
                adapter["init"] = "random"
            elif value is not True:
                bad(key, f"init_weights={value!r} is not supported by adaptc (true or false)")
        elif value not in (None, False, {}, [], ""):
            bad(key, f"{key!r} is not a TrainableTokensConfig option")
    return adapter


SPEC = MethodSpec(
    name="trainable_tokens",
    model=TrainableTokensAdapter,
    peft_type="TRAINABLE_TOKENS",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={"targets": "target_modules", "init": "init_weights"},
)
