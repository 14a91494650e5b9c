"""OFT in the spec: the adapter's settings and PEFT's ``OFTConfig`` both ways.

The keys keep PEFT's names (``r``, ``oft_block_size``, ``module_dropout``, ``coft``,
``eps``, ``block_share``, ``use_cayley_neumann``, ``num_cayley_neumann_terms``,
``fan_in_fan_out``, ``bias``); ``init_weights`` True/False becomes ``init:
identity``/``random``. Exactly one of ``r`` and ``oft_block_size`` is non-zero, as
``OFTConfig.__post_init__`` requires; the per-layer pair is resolved by
:func:`resolve_blocks` (PEFT's ``update_layer`` rule) without touching the spec.
Options adaptc does not implement are refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, model_validator

from adaptc.spec.fields import (
    Dropout,
    ExcludeField,
    FanInFanOutField,
    FieldError,
    LayerSelection,
    ModulesToSaveField,
    TargetsField,
    check_selection,
    closed,
)
from adaptc.spec.method import PEFT_FORMAT_VERSION, Bad, MethodSpec
from adaptc.spec.peft_options import options_from_peft
from adaptc.spec.peft_targets import selection_to_peft

__all__ = ["SPEC", "OFTAdapter", "adjust", "resolve_blocks"]


class OFTAdapter(BaseModel):
    """One OFT adapter: a block-diagonal orthogonal matrix ``R`` (Cayley transform of
    skew-symmetric blocks) rotates each target's input features,
    ``x ↦ W₀(R x)``, i.e. the layer computes with the weight ``W₀Rᵀ``."""

    model_config = closed("OFTAdapter")

    method: Literal["oft"] = Field(
        description="Adapter method `oft`: orthogonal finetuning (PEFT `OFTConfig`)."
    )
    targets: TargetsField = None
    exclude: ExcludeField = None
    layers: LayerSelection | None = Field(
        default=None,
        description="Adapt only the targets inside these layer indices (PEFT "
        "`layers_to_transform`).",
    )
    r: StrictInt = Field(
        default=0,
        ge=0,
        description="Number of OFT blocks per layer; 0 derives it from `oft_block_size`. "
        "Exactly one of `r` and `oft_block_size` is non-zero (r × block size = the layer's "
        "input dimension; a value that does not divide it is moved to the nearest divisor, "
        "as PEFT does, with a warning).",
    )
    oft_block_size: StrictInt = Field(
        default=32,
        ge=0,
        description="Size of each OFT block; 0 derives it from `r`. Exactly one of `r` and "
        "`oft_block_size` is non-zero.",
    )
    module_dropout: Dropout = Field(
        default=0.0,
        description="PEFT's multiplicative block dropout probability. peft 0.21.2 builds the "
        "dropout but never applies it; adaptc keeps the value and, like PEFT, ignores it.",
    )
    fan_in_fan_out: FanInFanOutField = False
    bias: Literal["none", "all", "oft_only"] = Field(
        default="none",
        description="Which existing biases train: `none`, `all` biases in the model, or "
        "`oft_only` (biases of targeted modules).",
    )
    init: Literal["identity", "random"] = Field(
        default="identity",
        description="Initialisation of the skew parameters: `identity` (zeros: R = I, "
        "starts as a no-op) or `random` (normal, std 0.1; for tests). PEFT `init_weights` "
        "true/false.",
    )
    modules_to_save: ModulesToSaveField = ()
    coft: StrictBool = Field(
        default=False,
        description="Constrained OFT: before each use, project the parameters into an "
        "`eps` ball around zero (in place, without gradient), as PEFT does.",
    )
    eps: float = Field(
        default=6e-5,
        gt=0,
        allow_inf_nan=False,
        description="COFT's radius (the freedom of rotation); only used with `coft`.",
    )
    block_share: StrictBool = Field(
        default=False,
        description="Share one block between all the blocks of a layer.",
    )
    use_cayley_neumann: StrictBool = Field(
        default=True,
        description="Approximate the Cayley transform's inverse by a Neumann series (fast, "
        "approximately orthogonal); false solves it exactly.",
    )
    num_cayley_neumann_terms: StrictInt = Field(
        default=5,
        ge=1,
        description="Number of Neumann series terms (with `use_cayley_neumann`).",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> OFTAdapter:
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        if self.r == 0 and self.oft_block_size == 0:
            raise FieldError(
                ("r",),
                "either r or oft_block_size must be non-zero (both are 0)",
            )
        if self.r != 0 and self.oft_block_size != 0:
            raise FieldError(
                ("oft_block_size",),
                f"set only one of r ({self.r}) and oft_block_size ({self.oft_block_size}): "
                "r × oft_block_size is the layer's input dimension (set the other to 0)",
            )
        return self


def adjust(features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``features`` nearest ``value``
    (the lower one on a tie); ``features`` itself when ``value`` is not below it."""
    if value >= features:
        return features
    higher = value
    while higher <= features and features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def resolve_blocks(a: OFTAdapter, features: int) -> tuple[int, int, str | None]:
    """``(r, block_size, warning)`` on a layer whose rotated dimension is ``features``
    (in_features; in_channels·k·k for a convolution), as PEFT's ``update_layer``."""
    if a.r == 0:
        size = a.oft_block_size
        warning = None
        if features % size != 0 or size > features:
            size = adjust(features, size)
            warning = f"Invalid `oft_block_size` ({a.oft_block_size})! Adjusted to ({size})."
        return features // size, size, warning
    r = a.r
    warning = None
    if features % r != 0 or r > features:
        r = adjust(features, r)
        warning = f"Invalid `r` ({a.r})! Adjusted `r` to ({r})."
    return r, features // r, warning


# OFTConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "OFT",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 0,
    "oft_block_size": 32,
    "module_dropout": 0.0,
    "target_modules": None,
    "fan_in_fan_out": False,
    "bias": "none",
    "exclude_modules": None,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
    "coft": False,
    "eps": 6e-05,
    "block_share": False,
    "use_cayley_neumann": True,
    "num_cayley_neumann_terms": 5,
}
_PLAIN: tuple[str, ...] = (
    "r",
    "oft_block_size",
    "module_dropout",
    "fan_in_fan_out",
    "bias",
    "coft",
    "eps",
)
_PLAIN += ("block_share", "use_cayley_neumann", "num_cayley_neumann_terms")


def to_peft(a: OFTAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``OFTConfig`` for ``a``, in its key order (envelope keys at their defaults)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    cfg.update(selection_to_peft(a, target_modules))
    for key in _PLAIN:
        cfg[key] = getattr(a, key)
    cfg["init_weights"] = a.init == "identity"
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``OFTConfig``; unsupported options are refused."""
    if "oft_block_size" not in cfg:
        bad(
            "oft_block_size",
            "an OFT adapter without oft_block_size was written by peft < 0.14, whose weights "
            "are incompatible (retrain it with a newer peft)",
        )
    return options_from_peft(
        cfg, bad, method="oft", title="OFT", plain=_PLAIN, inits={"identity": True, "random": False}
    )


SPEC = MethodSpec(
    name="oft",
    model=OFTAdapter,
    peft_type="OFT",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        "targets": "target_modules",
        "exclude": "exclude_modules",
        "layers": "layers_to_transform",
        "init": "init_weights",
    },
)
