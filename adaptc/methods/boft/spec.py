"""BOFT in the spec: the adapter's settings and PEFT's ``BOFTConfig`` both ways.

The keys keep PEFT's names (``boft_block_size``, ``boft_block_num``,
``boft_n_butterfly_factor``, ``boft_dropout``, ``fan_in_fan_out``, ``bias``);
``init_weights`` True/False becomes ``init: identity``/``random``. Exactly one of
``boft_block_size`` and ``boft_block_num`` is non-zero, as ``BOFTConfig.__post_init__``
requires; the per-layer pair is resolved by :func:`resolve_blocks` (PEFT's
``update_layer`` rules, with its messages) without touching the spec.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictInt, model_validator

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

__all__ = ["SPEC", "BOFTAdapter", "resolve_blocks"]


class BOFTAdapter(BaseModel):
    """One BOFT adapter: a butterfly product of block-diagonal orthogonal matrices ``R``
    (Cayley transforms) rotates each target's input features and a vector ``s`` scales
    its outputs: the layer computes with the weight ``diag(s)·W₀·Rᵀ``."""

    model_config = closed("BOFTAdapter")

    method: Literal["boft"] = Field(
        description="Adapter method `boft`: butterfly orthogonal finetuning (PEFT `BOFTConfig`)."
    )
    targets: TargetsField = None
    exclude: ExcludeField = None
    layers: LayerSelection | None = Field(
        default=None,
        description="Adapt only the targets inside these layer indices (PEFT "
        "`layers_to_transform`).",
    )
    boft_block_size: StrictInt = Field(
        default=4,
        ge=0,
        description="Size of each BOFT block; 0 derives it from `boft_block_num`. Exactly "
        "one of `boft_block_size` and `boft_block_num` is non-zero (size × number = the "
        "layer's input dimension, which it must divide).",
    )
    boft_block_num: StrictInt = Field(
        default=0,
        ge=0,
        description="Number of BOFT blocks per layer; 0 derives it from `boft_block_size`.",
    )
    boft_n_butterfly_factor: StrictInt = Field(
        default=1,
        ge=1,
        description="Number of butterfly factors; 1 is plain block-diagonal OFT. (peft "
        "without its CUDA extension `fbd_cuda` silently uses 1; adaptc uses the value.)",
    )
    boft_dropout: Dropout = Field(
        default=0.0,
        description="Multiplicative dropout: in training, this fraction of the blocks of "
        "one random butterfly factor is replaced by the identity.",
    )
    fan_in_fan_out: FanInFanOutField = False
    bias: Literal["none", "all", "boft_only"] = Field(
        default="none",
        description="Which existing biases train: `none`, `all` biases in the model, or "
        "`boft_only` (biases of targeted modules).",
    )
    init: Literal["identity", "random"] = Field(
        default="identity",
        description="Initialisation: `identity` (R's parameters zero, s one: a no-op) or "
        "`random` (normal, std 0.1, s around 1; for tests). PEFT `init_weights` true/false.",
    )
    modules_to_save: ModulesToSaveField = ()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> BOFTAdapter:
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise FieldError(
                ("boft_block_size",),
                "either boft_block_size or boft_block_num must be non-zero (both are 0)",
            )
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise FieldError(
                ("boft_block_num",),
                f"set only one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}): size × number is the layer's input dimension "
                "(set the other to 0)",
            )
        return self


def resolve_blocks(a: BOFTAdapter, features: int, what: str) -> tuple[int, int, int]:
    """``(factors, block_num, block_size)`` on a layer whose rotated dimension is
    ``features`` (``what`` names it in messages: PEFT's ``in_features (…)`` or
    ``Convolutional kernel dimension (…)``), by PEFT's ``update_layer`` rules; ValueError
    with PEFT's message when they fail."""
    extra = a.boft_n_butterfly_factor - 1  # PEFT's boft_n_butterfly_factor after its -1
    factor = a.boft_n_butterfly_factor
    size, num = a.boft_block_size, a.boft_block_num
    if size == 0:
        if features % num != 0:
            raise ValueError(f"{what} ({features}) must be divisible by boft_block_num ({num})!")
        if extra != 0:
            if extra > int(math.log2(num)):
                raise ValueError(
                    f"Invalid combination of boft_n_butterfly_factor ({factor}) and "
                    f"boft_block_num ({num})!"
                )
            if num % (2**extra) != 0:
                raise ValueError(
                    f"boft_block_num ({num}) must be a multiple of 2 raised to the power of "
                    f"boft_n_butterfly_factor ({factor})!"
                )
        size = features // num
    else:
        if features % size != 0:
            raise ValueError(f"{what} ({features}) must be divisible by boft_block_size ({size})!")
        if extra != 0 and (features < size * 2**extra or features % (size * 2**extra) != 0):
            raise ValueError(
                f"Invalid combination of {what} ({features}), boft_n_butterfly_factor "
                f"({factor}) and boft_block_size ({size})!"
            )
        num = features // size
    if extra != 0:
        if num % 2 != 0:
            raise ValueError(f"boft_block_num ({num}) must be an even number!")
        if size % 2 != 0:
            raise ValueError(f"boft_block_size ({size}) must be an even number!")
    return factor, num, size


# BOFTConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "BOFT",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "boft_block_size": 4,
    "boft_block_num": 0,
    "boft_n_butterfly_factor": 1,
    "target_modules": None,
    "exclude_modules": None,
    "boft_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
}
_PLAIN: tuple[str, ...] = (
    "boft_block_size",
    "boft_block_num",
    "boft_n_butterfly_factor",
    "boft_dropout",
    "fan_in_fan_out",
    "bias",
)


def to_peft(a: BOFTAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``BOFTConfig`` for ``a``, in its key order (envelope keys at their defaults)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    cfg.update(selection_to_peft(a, target_modules))
    for key in _PLAIN:
        cfg[key] = getattr(a, key)
    cfg["init_weights"] = a.init == "identity"
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``BOFTConfig``; unsupported options are refused."""
    return options_from_peft(
        cfg,
        bad,
        method="boft",
        title="BOFT",
        plain=_PLAIN,
        inits={"identity": True, "random": False},
    )


SPEC = MethodSpec(
    name="boft",
    model=BOFTAdapter,
    peft_type="BOFT",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        "targets": "target_modules",
        "exclude": "exclude_modules",
        "layers": "layers_to_transform",
        "init": "init_weights",
    },
)
