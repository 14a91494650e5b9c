"""LoKr in the spec: the adapter's settings and PEFT's ``LoKrConfig`` both ways.

``init_weights`` True/False/"lycoris" becomes ``init: default``/``random``/``lycoris``;
the other keys keep PEFT's names (``r``, ``alpha``, ``rank_dropout``, ``module_dropout``,
``use_effective_conv2d``, ``decompose_both``, ``decompose_factor``,
``rank_dropout_scale``, ``rank_pattern``, ``alpha_pattern``). Options adaptc does not
implement are refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, model_validator

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

__all__ = ["SPEC", "LoKrAdapter"]


class LoKrAdapter(BaseModel):
    """One LoKr adapter: a Kronecker product update ``ΔW = (alpha/r)·kron(w1, w2)``, each
    factor full or of rank ``r`` (``w1_a @ w1_b``, ``w2_a @ w2_b``), the shapes from PEFT's
    ``factorization`` of the layer's input and output sizes: ``x ↦ W₀x + ΔW x``."""

    model_config = closed("LoKrAdapter")

    method: Literal["lokr"] = Field(
        description="Adapter method `lokr`: a low-rank Kronecker product update (PEFT "
        "`LoKrConfig`)."
    )
    targets: TargetsField = None
    exclude: ExcludeField = None
    layers: LayerSelection | None = Field(
        default=None,
        description="Adapt only the targets inside these layer indices (PEFT "
        "`layers_to_transform`).",
    )
    r: PositiveInt = Field(
        default=8,
        description="Rank of the factors that are decomposed; a factor whose sides are both "
        "at most `2r` is kept full (PEFT `r`).",
    )
    alpha: PositiveNumber = Field(
        default=8, description="Scaling numerator: the update is scaled by `alpha / r`."
    )
    rank_dropout: Dropout = Field(
        default=0.0,
        description="In training, the probability of zeroing each output row of the update.",
    )
    module_dropout: Dropout = Field(
        default=0.0,
        description="In training, the probability of skipping the whole update for a step.",
    )
    rank_dropout_scale: StrictBool = Field(
        default=False,
        description="Divide the kept rows by their fraction when `rank_dropout` drops rows.",
    )
    use_effective_conv2d: StrictBool = Field(
        default=False,
        description="For convolutions with a kernel larger than 1: factor `w2` as a core "
        "tensor `lokr_t2` (r, r, *kernel) with `lokr_w2_a`/`lokr_w2_b` (FedPara's "
        "proposition 3).",
    )
    decompose_both: StrictBool = Field(
        default=False,
        description="Also decompose the left factor `w1` into `lokr_w1_a @ lokr_w1_b` when it "
        "is large enough.",
    )
    decompose_factor: StrictInt = Field(
        default=-1,
        description="The size to split each dimension by (a divisor of it, else the nearest "
        "split not above it); -1 splits near the square root (PEFT `factorization`).",
    )
    init: Literal["default", "random", "lycoris"] = Field(
        default="default",
        description="Initialisation: `default` (`w1` zeros: starts as a no-op), `lycoris` "
        "(`w2` zeros, as the LyCORIS repository) or `random` (all Kaiming uniform; for "
        'tests). PEFT `init_weights` true / "lycoris" / false.',
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
    def _cross_field_rules(self) -> LoKrAdapter:
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"decompose_factor must be -1 or a positive integer, not {self.decompose_factor}"
            )
        return self


# LoKrConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "LOKR",
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
    "decompose_both": False,
    "decompose_factor": -1,
    "rank_dropout_scale": False,
    "target_modules": None,
    "exclude_modules": None,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
}
_PLAIN: tuple[str, ...] = ("r", "alpha", "rank_dropout", "module_dropout")
_PLAIN += ("use_effective_conv2d",)
_PLAIN += ("decompose_both", "decompose_factor", "rank_dropout_scale")
_PATTERNS = ("rank_pattern", "alpha_pattern")
_INIT_TO_PEFT: dict[str, bool | str] = {"default": True, "random": False, "lycoris": "lycoris"}


def to_peft(a: LoKrAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``LoKrConfig`` for ``a``, in its key order (envelope keys at their defaults)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    cfg.update(selection_to_peft(a, target_modules))
    for key in _PLAIN:
        cfg[key] = getattr(a, key)
    for key in _PATTERNS:
        cfg[key] = dict(getattr(a, key))
    cfg["init_weights"] = _INIT_TO_PEFT[a.init]
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``LoKrConfig``; unsupported options are refused."""
    return options_from_peft(
        cfg,
        bad,
        method="lokr",
        title="LoKr",
        plain=_PLAIN,
        inits={"default": True, "random": False, "lycoris": "lycoris"},
        patterns=_PATTERNS,
    )


SPEC = MethodSpec(
    name="lokr",
    model=LoKrAdapter,
    peft_type="LOKR",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        "targets": "target_modules",
        "exclude": "exclude_modules",
        "layers": "layers_to_transform",
        "init": "init_weights",
    },
)
