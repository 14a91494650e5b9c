"""LoRA in the spec: the adapter's settings and PEFT's ``LoraConfig`` both ways.

``init_lora_weights`` True/False/a name/``pissa_niter_N`` becomes ``init`` (+ ``pissa_niter``);
options adaptc does not implement are refused by name instead of being dropped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, model_validator

from adaptc.spec.fields import (
    Dropout,
    ExcludeField,
    FanInFanOutField,
    FieldError,
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
from adaptc.spec.peft_targets import (
    PEFT_KEYS,
    SELECTION_KEYS,
    selection_from_peft,
    selection_to_peft,
)

__all__ = ["SPEC", "LoraAdapter"]


class LoraAdapter(BaseModel):
    """One LoRA adapter: ``x ↦ W₀x + s·B·A·x``, ``s = lora_alpha / r`` (``/ √r`` with rsLoRA)."""

    model_config = closed("LoraAdapter")

    method: Literal["lora"] = Field(
        default="lora", description="Adapter method; `lora` when omitted."
    )
    r: PositiveInt = Field(default=8, description="Rank of the update `B·A` (PEFT `r`).")
    lora_alpha: PositiveNumber = Field(
        default=8, description="Scaling numerator: the update is scaled by `lora_alpha / r`."
    )
    lora_dropout: Dropout = Field(
        default=0.0, description="Dropout probability on the LoRA branch input, in [0, 1)."
    )
    targets: TargetsField = None
    exclude: ExcludeField = None
    layers: LayerSelection | None = Field(
        default=None, description="Adapt only the targets inside these layer indices."
    )
    rank_pattern: dict[Regex, PositiveInt] = Field(
        default={},
        description="Per-module ranks overriding `r`; a key matches a module whose name matches "
        "`(.*\\.)?KEY$`, first matching key wins (PEFT `rank_pattern`).",
    )
    alpha_pattern: dict[Regex, PositiveNumber] = Field(
        default={},
        description="Per-module alphas overriding `lora_alpha`, keys as in `rank_pattern`.",
    )
    use_rslora: StrictBool = Field(
        default=False, description="Rank-stabilised LoRA: scale by `lora_alpha / √r`."
    )
    use_dora: StrictBool = Field(
        default=False,
        description="DoRA: decompose the update into magnitude and direction (learned magnitude).",
    )
    init: Literal["default", "gaussian", "pissa", "olora", "orthogonal", "mica", "random"] = Field(
        default="default",
        description="Initialisation: `default` (Kaiming-uniform A, zero B: starts as a no-op), "
        "`gaussian` (normal A with std 1/r, zero B), `pissa` and `olora` (from the base weight, "
        "which they modify), `orthogonal` (random A and B with orthogonal rows, so B·A = 0; even "
        "`r`; not for convolutions), `mica` (B from the base weight's r minor left singular "
        "vectors and frozen, A zero: only A trains; linear layers and embeddings), `random` "
        "(both random; for tests). PEFT `init_lora_weights`.",
    )
    pissa_niter: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None,
        description="With `init: pissa`, use fast randomised SVD with this many subspace "
        "iterations (PEFT `pissa_niter_N`); omitted means the exact SVD.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none",
        description="Which existing biases train: `none`, `all` biases in the model, or "
        "`lora_only` (biases of targeted modules).",
    )
    lora_bias: StrictBool = Field(
        default=False, description="Give the LoRA `B` projection a trainable bias."
    )
    fan_in_fan_out: FanInFanOutField = False
    modules_to_save: ModulesToSaveField = ()
    alora_invocation_tokens: (
        Annotated[tuple[Annotated[StrictInt, Field(ge=0)], ...], Field(min_length=1)] | None
    ) = Field(
        default=None,
        description="Activated LoRA (aLoRA): the token ids of the invocation sequence. In each "
        "input the adapter applies from the sequence's last occurrence on (and to the tokens "
        "generated after it); before it the model is the base model, so its cache can be "
        "reused. Linear layers only; cannot be merged. PEFT `alora_invocation_tokens`.",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> LoraAdapter:
        if self.use_dora and self.lora_bias:
            raise FieldError(("lora_bias",), "lora_bias cannot be combined with use_dora")
        if self.lora_bias and self.init not in ("default", "random"):
            raise FieldError(
                ("lora_bias",), f"lora_bias needs init 'default' or 'random', not {self.init!r}"
            )
        if self.init == "mica" and self.use_dora:
            raise FieldError(("init",), "init 'mica' cannot be combined with use_dora")
        if self.alora_invocation_tokens is not None and (self.use_dora or self.init == "mica"):
            other = "use_dora" if self.use_dora else "init 'mica'"
            raise FieldError(
                ("alora_invocation_tokens",),
                f"alora_invocation_tokens cannot be combined with {other}",
            )
        if self.pissa_niter is not None and self.init != "pissa":
            raise FieldError(("pissa_niter",), f"pissa_niter needs init 'pissa', not {self.init!r}")
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        return self


# LoraConfig.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "LORA",
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
    "rank_pattern": {},
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
}
# Keys copied one to one between the two formats.
_SAME = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
)


_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
_ENVELOPE = {"peft_type", "peft_version", "auto_mapping", "inference_mode", "task_type"}
_ENVELOPE |= {"base_model_name_or_path", "revision", "megatron_core", "qalora_group_size"}
_ENVELOPE |= {"runtime_config"}


def to_peft(a: LoraAdapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` for ``a``, in its key order (envelope keys at their defaults)."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    for key in _SAME:
        value = getattr(a, key)
        cfg[key] = dict(value) if isinstance(value, Mapping) else value
    cfg.update(selection_to_peft(a, target_modules))
    cfg["init_lora_weights"] = {"default": True, "random": False}.get(a.init, a.init)
    if a.pissa_niter is not None:
        cfg["init_lora_weights"] = f"pissa_niter_{a.pissa_niter}"
    if a.alora_invocation_tokens is not None:
        cfg["alora_invocation_tokens"] = list(a.alora_invocation_tokens)
    return cfg


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``LoraConfig``; unsupported options are refused."""
    adapter: dict[str, Any] = {"method": "lora"}
    selection_from_peft(cfg, adapter)
    for key, value in cfg.items():
        if key in _ENVELOPE or key in SELECTION_KEYS:
            continue
        if key in _SAME:
            adapter[key] = {} if value is None and key.endswith("pattern") else value
        elif key == "init_lora_weights":
            _init(value, adapter, bad)
        elif key == "alora_invocation_tokens":
            if value is not None:
                adapter[key] = value
        elif value not in (None, False, {}, [], "") and value != _PEFT_DEFAULTS.get(key):
            bad(key, f"{key!r} is not supported by adaptc")
    if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
        bad("layers_pattern", "layers_pattern needs layers_to_transform")
    return adapter


def _init(value: Any, adapter: dict[str, Any], bad: Bad) -> None:
    if value is True:
        return
    if value is False:
        adapter["init"] = "random"
    elif value in ("gaussian", "pissa", "olora", "orthogonal", "mica"):
        adapter["init"] = value
    elif isinstance(value, str) and _PISSA_NITER.fullmatch(value):
        adapter["init"] = "pissa"
        adapter["pissa_niter"] = int(value.rsplit("_", 1)[1])
    else:
        bad("init_lora_weights", f"init_lora_weights={value!r} is not supported by adaptc")


SPEC = MethodSpec(
    name="lora",
    model=LoraAdapter,
    peft_type="LORA",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={**PEFT_KEYS, "init": "init_lora_weights", "pissa_niter": "init_lora_weights"},
)
