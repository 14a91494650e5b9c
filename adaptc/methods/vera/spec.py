"""VeRA in the spec: the adapter's settings and PEFT's ``VeraConfig`` both ways.

``init_weights`` True/False becomes ``init: default``/``random``; the other keys keep
PEFT's names (``r``, ``projection_prng_key``, ``save_projection``, ``vera_dropout``,
``d_initial``, ``fan_in_fan_out``, ``bias``). PEFT's ``VeraConfig`` has no
``exclude_modules``, so a VeRA adapter has no ``exclude``. Options adaptc does not
implement are refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, model_validator

from adaptc.spec.fields import (
    Dropout,
    FanInFanOutField,
    LayerSelection,
    ModulesToSaveField,
    PositiveInt,
    TargetsField,
    check_selection,
    closed,
)
from adaptc.spec.method import PEFT_FORMAT_VERSION, Bad, MethodSpec
from adaptc.spec.peft_options import options_from_peft
from adaptc.spec.peft_targets import selection_to_peft

__all__ = ["SPEC", "VeraAdapter"]


class VeraAdapter(BaseModel):
    """One VeRA adapter: frozen random projections ``A`` (r, in) and ``B`` (out, r), shared
    by all its targets, and per-target trainable vectors ``d`` (r) and ``b`` (out):
    ``x ↦ W₀x + b ⊙ B(d ⊙ A x)``."""

    model_config = closed("VeraAdapter")

    method: Literal["vera"] = Field(
        description="Adapter method `vera`: shared random projections scaled by trained "
        "vectors (PEFT `VeraConfig`)."
    )
    targets: TargetsField = None
    exclude: ClassVar[None] = None  # PEFT's VeraConfig has no exclude_modules
    layers: LayerSelection | None = Field(
        default=None,
        description="Adapt only the targets inside these layer indices (PEFT "
        "`layers_to_transform`).",
    )
    r: PositiveInt = Field(
        default=256, description="Rank of the shared random projections (PEFT `r`)."
    )
    projection_prng_key: StrictInt = Field(
        default=0,
        description="Seed of the CPU generator that draws the shared projections `vera_A` "
        "and `vera_B` (Kaiming uniform), as PEFT draws them.",
    )
    save_projection: StrictBool = Field(
        default=True,
        description="Write `vera_A`/`vera_B` into the adapter file (`base_model.vera_A`, "
        "`base_model.vera_B`); when false they are regenerated from `projection_prng_key` on "
        "load.",
    )
    vera_dropout: Dropout = Field(
        default=0.0, description="Dropout probability on the VeRA branch input, in [0, 1)."
    )
    d_initial: float = Field(
        default=0.1,
        description="Initial value of every entry of the vector `d` (PEFT `d_initial`).",
        allow_inf_nan=False,
    )
    fan_in_fan_out: FanInFanOutField = False
    bias: Literal["none", "all", "vera_only"] = Field(
        default="none",
        description="Which existing biases train: `none`, `all` biases in the model, or "
        "`vera_only` (biases of targeted modules).",
    )
    init: Literal["default", "random"] = Field(
        default="default",
        description="Initialisation of the vectors: `default` (`b` zeros, `d` = `d_initial`: "
        "starts as a no-op) or `random` (`b` ones, `d` standard normal; for tests). PEFT "
        "`init_weights` true/false.",
    )
    modules_to_save: ModulesToSaveField = ()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> VeraAdapter:
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        return self


# VeraConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "VERA",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 256,
    "target_modules": None,
    "projection_prng_key": 0,
    "save_projection": True,
    "vera_dropout": 0.0,
    "d_initial": 0.1,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
}
_PLAIN: tuple[str, ...] = (
    "r",
    "projection_prng_key",
    "save_projection",
    "vera_dropout",
    "d_initial",
)
_PLAIN += ("fan_in_fan_out", "bias")


def to_peft(a: VeraAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``VeraConfig`` for ``a``, in its key order (envelope keys at their defaults)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    selection = selection_to_peft(a, target_modules)
    cfg.update(selection)
    for key in _PLAIN:
        cfg[key] = getattr(a, key)
    cfg["init_weights"] = a.init == "default"
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``VeraConfig``; unsupported options are refused."""
    return options_from_peft(
        cfg,
        bad,
        method="vera",
        title="VeRA",
        plain=_PLAIN,
        inits={"default": True, "random": False},
    )


SPEC = MethodSpec(
    name="vera",
    model=VeraAdapter,
    peft_type="VERA",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        "targets": "target_modules",
        "layers": "layers_to_transform",
        "init": "init_weights",
    },
)
