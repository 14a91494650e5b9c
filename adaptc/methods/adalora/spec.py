"""AdaLoRA in the spec: the adapter's settings and PEFT's ``AdaLoraConfig`` both ways.

The keys keep PEFT's names (``target_r``, ``init_r``, ``tinit``, ``tfinal``, ``deltaT``,
``beta1``, ``beta2``, ``orth_reg_weight``, ``total_step``, ``lora_alpha``,
``lora_dropout``, ``fan_in_fan_out``); ``init_lora_weights`` True/False becomes
``init: default``/``random``. ``rank_pattern`` is keyed by target path (PEFT's keys are
``<path>.lora_E``), each a list of booleans: the singular triplets kept. LoRA options
that AdaLoRA ignores or adaptc does not implement are refused by name.
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
    PositiveInt,
    TargetsField,
    check_selection,
    closed,
)
from adaptc.spec.method import PEFT_FORMAT_VERSION, Bad, MethodSpec
from adaptc.spec.peft_targets import SELECTION_KEYS, selection_from_peft, selection_to_peft

__all__ = ["SPEC", "AdaLoraAdapter"]

_E = ".lora_E"  # PEFT's rank_pattern keys: the lora_E parameter's name


class AdaLoraAdapter(BaseModel):
    """One AdaLoRA adapter: an SVD-form update ``x ↦ W₀x + B(E ⊙ A x)·α/(r₀+1e-5)`` per
    target, ``A`` (r, in), ``E`` (r, 1), ``B`` (out, r), whose rank a budget schedule
    prunes from ``init_r`` towards ``target_r`` per layer during training."""

    model_config = closed("AdaLoraAdapter")

    method: Literal["adalora"] = Field(
        description="Adapter method `adalora`: adaptive-rank SVD LoRA (PEFT `AdaLoraConfig`)."
    )
    targets: TargetsField = None
    exclude: ExcludeField = None
    layers: LayerSelection | None = Field(
        default=None,
        description="Adapt only the targets inside these layer indices (PEFT "
        "`layers_to_transform`).",
    )
    target_r: PositiveInt = Field(default=8, description="Target average rank per layer.")
    init_r: PositiveInt = Field(default=12, description="Initial rank of every layer.")
    tinit: StrictInt = Field(default=0, ge=0, description="Steps of warm-up before pruning.")
    tfinal: StrictInt = Field(default=0, ge=0, description="Steps of final fine-tuning.")
    deltaT: PositiveInt = Field(default=1, description="Steps between two budget allocations.")
    beta1: float = Field(
        default=0.85, gt=0, lt=1, description="EMA factor of the sensitivity smoothing."
    )
    beta2: float = Field(
        default=0.85, gt=0, lt=1, description="EMA factor of the uncertainty quantification."
    )
    orth_reg_weight: float = Field(
        default=0.5, ge=0, allow_inf_nan=False, description="Weight of the orthogonal regulariser."
    )
    total_step: PositiveInt = Field(
        description="Total training steps (required, as in PEFT): the budget schedule's length."
    )
    rank_pattern: dict[str, tuple[StrictBool, ...]] | None = Field(
        default=None,
        description="The allocated ranks by target path: the kept singular triplets "
        "(written by `update_and_allocate`; a loaded adapter is resized to it).",
    )
    lora_alpha: float = Field(
        default=8,
        allow_inf_nan=False,
        description="Scaling: the update is scaled by `lora_alpha / (init_r + 1e-5)` "
        "(`init_r` for a non-positive `lora_alpha`).",
    )
    lora_dropout: Dropout = Field(default=0.0, description="Dropout on the branch input.")
    fan_in_fan_out: FanInFanOutField = False
    init: Literal["default", "random"] = Field(
        default="default",
        description="`default`: E zeros, A and B normal(0, 0.02) (starts as a no-op); "
        "`random`: all standard normal (for tests). PEFT `init_lora_weights` true/false.",
    )
    modules_to_save: ModulesToSaveField = ()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> AdaLoraAdapter:
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        if self.tinit >= self.total_step - self.tfinal:
            raise FieldError(
                ("tinit",),
                "the schedule leaves no budgeting phase (tinit >= total_step - tfinal): "
                "decrease tfinal/tinit or increase total_step",
            )
        return self


# AdaLoraConfig(total_step=...).to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "ADALORA",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": None,
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
    "target_r": 8,
    "init_r": 12,
    "tinit": 0,
    "tfinal": 0,
    "deltaT": 1,
    "beta1": 0.85,
    "beta2": 0.85,
    "orth_reg_weight": 0.5,
    "total_step": None,
}
_ENVELOPE = {"peft_type", "peft_version", "auto_mapping", "inference_mode", "task_type"}
_ENVELOPE |= {"base_model_name_or_path", "revision"}
_PLAIN: tuple[str, ...] = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2")
_PLAIN += ("orth_reg_weight", "total_step", "lora_alpha", "lora_dropout", "fan_in_fan_out")
# LoraConfig keys AdaLoRA ignores, with the values that mean "nothing" besides the default
_IGNORED = {"r", "megatron_core", "qalora_group_size"}


def to_peft(a: AdaLoraAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``AdaLoraConfig`` for ``a``, in its key order (envelope keys at their defaults)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    cfg.update(selection_to_peft(a, target_modules))
    for key in _PLAIN:
        cfg[key] = getattr(a, key)
    cfg["init_lora_weights"] = a.init == "default"
    if a.rank_pattern is not None:
        cfg["rank_pattern"] = {f"{p}{_E}": list(m) for p, m in a.rank_pattern.items()}
    return cfg


def _rank_pattern_from_peft(value: Any, bad: Bad) -> dict[str, list[Any]] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        bad("rank_pattern", "rank_pattern must be a mapping of lora_E names to lists of booleans")
        return None
    out: dict[str, list[Any]] = {}
    for key, mask in value.items():
        path, sep, rest = str(key).rpartition(_E)
        if not sep or (rest != "" and not rest.startswith(".")):
            bad("rank_pattern", f"rank_pattern key {key!r} does not name a lora_E parameter")
            continue
        out[path] = list(mask) if isinstance(mask, (list, tuple)) else mask
    return out


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``AdaLoraConfig``; unsupported options refused."""
    adapter: dict[str, Any] = {"method": "adalora"}
    selection_from_peft(cfg, adapter)
    for key, value in cfg.items():
        if key in _ENVELOPE or key in SELECTION_KEYS or key in _IGNORED:
            continue
        if key in _PLAIN:
            if value is not None:
                adapter[key] = value
        elif key == "rank_pattern":
            pattern = _rank_pattern_from_peft(value, bad)
            if pattern is not None:
                adapter["rank_pattern"] = pattern
        elif key == "init_lora_weights":
            if value is False:
                adapter["init"] = "random"
            elif value is not True:
                bad(key, f"init_lora_weights={value!r} is not supported by adaptc for AdaLoRA")
        elif key == "bias" and value == "none":
            continue
        elif value not in (None, False, {}, [], ""):
            bad(key, f"{key!r} is not supported by adaptc for AdaLoRA")
    return adapter


SPEC = MethodSpec(
    name="adalora",
    model=AdaLoraAdapter,
    peft_type="ADALORA",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        "targets": "target_modules",
        "exclude": "exclude_modules",
        "layers": "layers_to_transform",
        "init": "init_lora_weights",
    },
)
