"""LoHa in the spec: the adapter's settings and PEFT's ``LoHaConfig`` both ways.

``init_weights`` True/False becomes ``init: default``/``random``; the other keys keep
PEFT's names (``r``, ``alpha``, ``rank_dropout``, ``module_dropout``,
``use_effective_conv2d``, ``rank_pattern``, ``alpha_pattern``). Options adaptc does not
implement are refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, model_validator

from adaptc.spec.fields import (
    Dropout,
    ExcludeField,
    LayerSelection,
    ModulesToSaveField,
    PositiveInt,
    PositiveNumber,
    Regex,
    TargetsField,
    check_selection,
    closed,
)
from adaptc.spec.method import PEFT_FORMAT_VERSION, Bad, MethodSpec
from adaptc.spec.peft_options import options_from_peft
from adaptc.spec.peft_targets import selection_to_peft

__all__ = ["SPEC", "LoHaAdapter"]


class LoHaAdapter(BaseModel):
    """One LoHa adapter: a Hadamard product of two rank-``r`` products,
    ``ΔW = (alpha/r)·(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``: ``x ↦ W₀x + ΔW x``."""

    model_config = closed("LoHaAdapter")

    method: Literal["loha"] = Field(
        description="Adapter method `loha`: a low-rank Hadamard product update (PEFT `LoHaConfig`)."
    )
    targets: TargetsField = None
    exclude: ExcludeField = None
    layers: LayerSelection | None = Field(
        default=None,
        description="Adapt only the targets inside these layer indices (PEFT "
        "`layers_to_transform`).",
    )
    r: PositiveInt = Field(default=8, description="Rank of each of the two products (PEFT `r`).")
    alpha: PositiveNumber = Field(
        default=8, description="Scaling numerator: the update is scaled by `alpha / r`."
    )
    rank_dropout: Dropout = Field(
        default=0.0,
        description="In training, the probability of zeroing each output row of the update "
        "(kept rows divided by their fraction, as PEFT).",
    )
    module_dropout: Dropout = Field(
        default=0.0,
        description="In training, the probability of skipping the whole update for a step.",
    )
    use_effective_conv2d: StrictBool = Field(
        default=False,
        description="For convolutions with a kernel larger than 1: rebuild each factor from a "
        "core tensor `hada_t1`/`hada_t2` (r, r, *kernel) with `hada_w*_a` (r, out) and "
        "`hada_w*_b` (r, in) (FedPara's proposition 3).",
    )
    init: Literal["default", "random"] = Field(
        default="default",
        description="Initialisation: `default` (`w2_b` zeros: starts as a no-op) or `random` "
        "(all Kaiming uniform; for tests). PEFT `init_weights` true / false.",
    )
    rank_pattern: dict[Regex, PositiveInt] = Field(
        default={},
        description="Per-module ranks overriding `r`; a key matches a module whose name matches "
        "`(.*\\.)?KEY$`, first matching key wins (PEFT `rank_pattern`).",
    )
    alpha_pattern: dict[Regex, PositiveNumber] = Field(
        default={},
        description="Per-module alphas overriding `alpha`, keys as in `rank_pattern`.",
    )
    modules_to_save: ModulesToSaveField = ()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> LoHaAdapter:
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        return self


# LoHaConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "LOHA",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "r": 8,
    "alpha": 8,
    "rank_dropout": 0.0,
    "module_dropout": 0.0,
    "use_effective_conv2d": False,
    "target_modules": None,
    "exclude_modules": None,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
}
_PLAIN = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d")
_PATTERNS = ("rank_pattern", "alpha_pattern")


def to_peft(a: LoHaAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``LoHaConfig`` for ``a``, in its key order (envelope keys at their defaults)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    cfg.update(selection_to_peft(a, target_modules))
    for key in _PLAIN:
        cfg[key] = getattr(a, key)
    for key in _PATTERNS:
        cfg[key] = dict(getattr(a, key))
    cfg["init_weights"] = a.init == "default"
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``LoHaConfig``; unsupported options are refused."""
    return options_from_peft(
        cfg,
        bad,
        method="loha",
        title="LoHa",
        plain=_PLAIN,
        inits={"default": True, "random": False},
        patterns=_PATTERNS,
    )


SPEC = MethodSpec(
    name="loha",
    model=LoHaAdapter,
    peft_type="LOHA",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        "targets": "target_modules",
        "exclude": "exclude_modules",
        "layers": "layers_to_transform",
        "init": "init_weights",
    },
)
