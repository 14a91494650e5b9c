"""LoRA in the spec: the adapter's settings and PEFT's ``LoraConfig`` both ways.

``init_lora_weights`` True/False/a name/``pissa_niter_N`` becomes ``init`` (+ ``pissa_niter``);
options adaptc does not implement are refused by name instead of being dropped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    model_validator,
)

from adaptc.spec.fields import (
    Dropout,
    ExcludeField,
    FanInFanOutField,
    FieldError,
    LayerSelection,
    ModuleName,
    ModulesToSaveField,
    NameList,
    PositiveInt,
    PositiveNumber,
    Regex,
    TargetsField,
    TokenIndices,
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

__all__ = ["SPEC", "EvaSettings", "LoftqSettings", "LoraAdapter"]


def _token_form(value: Any) -> str:
    return "mapping" if isinstance(value, Mapping) else "list"


# LoRA's trainable_token_indices: token ids (of the input embedding), or a mapping from a
# module name (a plain suffix) to its token ids; validated as the form it has
TrainableTokenIndices = Annotated[
    Annotated[TokenIndices, Tag("list")]
    | Annotated[dict[ModuleName, TokenIndices], Field(min_length=1), Tag("mapping")],
    Discriminator(_token_form),
]


class LoftqSettings(BaseModel):
    """LoftQ's quantization (PEFT's ``LoftQConfig``): what the base weight is quantized to
    while ``A`` and ``B`` are chosen so that ``Q + B·A`` approximates it."""

    model_config = closed("LoftqSettings")

    bits: Literal[4, 8] = Field(
        default=4,
        description="Bits of the quantized base weight: `4` (bitsandbytes NF4, blocks of 64) "
        "or `8` (bitsandbytes int8, one scale per row). PEFT `loftq_bits`.",
    )
    iterations: PositiveInt = Field(
        default=1,
        description="Alternating steps: quantize `W - B·A`, then factor `W - Q` by a rank-`r` "
        "SVD (PEFT `loftq_iter`).",
    )


class EvaSettings(BaseModel):
    """EVA's data-driven initialisation (PEFT's ``EvaConfig``)."""

    model_config = closed("EvaSettings")

    rho: Annotated[float, Field(ge=1, strict=True, allow_inf_nan=False)] = Field(
        default=2.0,
        description="Rank redistribution: a layer may get up to `round(r * rho)` of the "
        "adapter's rank budget (the sum of the targets' ranks); `1` keeps every rank. PEFT "
        "`rho`.",
    )
    tau: Annotated[float, Field(ge=0, le=1, strict=True, allow_inf_nan=False)] = Field(
        default=0.99,
        description="Stop a layer's incremental SVD once the cosine similarity of each "
        "component it needs to the previous batch's reaches `tau`. PEFT `tau`.",
    )
    use_label_mask: StrictBool = Field(
        default=True,
        description="Leave out the tokens whose `labels` equal `label_mask_value` (besides "
        "the padding `attention_mask` excludes). PEFT `use_label_mask`.",
    )
    label_mask_value: StrictInt = Field(
        default=-100, description="The label of ignored tokens. PEFT `label_mask_value`."
    )
    whiten: StrictBool = Field(
        default=False,
        description="Divide each component by the square root of its singular value. PEFT "
        "`whiten`.",
    )
    adjust_scaling_factors: StrictBool = Field(
        default=True,
        description="Scale `lora_alpha` by `new_rank / r` where the rank changes, so the "
        "scaling `lora_alpha / r` stays as it was. PEFT `adjust_scaling_factors`.",
    )


def _layer_range(pair: tuple[int, int]) -> tuple[int, int]:
    start, end = pair
    if start >= end:
        raise ValueError(f"[{start}, {end}) is empty: a range is [start, end) with start < end")
    return pair


# PEFT's `layer_replication` entry: layers start, start+1, ..., end-1 of the original model.
LayerRange = Annotated[
    tuple[Annotated[StrictInt, Field(ge=0)], Annotated[StrictInt, Field(ge=0)]],
    AfterValidator(_layer_range),
]


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
    target_parameters: NameList | None = Field(
        default=None,
        description="Parameters that get a LoRA of their own, by full name or dotted suffix "
        "(e.g. `[mlp.experts.gate_up_proj, mlp.experts.down_proj]`: a mixture of experts' "
        "fused 3-D expert stacks, which no `nn.Linear` holds). The update is added to the "
        "parameter where its module reads it; a 3-D stack gets `r` per expert. Besides "
        "`targets` (set `targets: {kind: none}` for parameters only). PEFT "
        "`target_parameters`.",
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
    init: Literal[
        "default", "gaussian", "pissa", "olora", "orthogonal", "mica", "loftq", "eva", "random"
    ] = Field(
        default="default",
        description="Initialisation: `default` (Kaiming-uniform A, zero B: starts as a no-op), "
        "`gaussian` (normal A with std 1/r, zero B), `pissa` and `olora` (from the base weight, "
        "which they modify), `orthogonal` (random A and B with orthogonal rows, so B·A = 0; even "
        "`r`; not for convolutions), `mica` (B from the base weight's r minor left singular "
        "vectors and frozen, A zero: only A trains; linear layers and embeddings), `loftq` "
        "(the base weight replaced by its quantized form `Q`, A and B from an SVD of `W - Q`; "
        "float `nn.Linear` layers, needs bitsandbytes; see `loftq`), `eva` (A from the SVD of "
        "each layer's inputs over a dataloader's batches, ranks redistributed, zero B: call "
        "`adaptc.initialize_eva` on the compiled model; see `eva`), `random` (both random; "
        "for tests). PEFT `init_lora_weights`.",
    )
    pissa_niter: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None,
        description="With `init: pissa`, use fast randomised SVD with this many subspace "
        "iterations (PEFT `pissa_niter_N`); omitted means the exact SVD.",
    )
    loftq: LoftqSettings | None = Field(
        default=None,
        description="With `init: loftq`: the quantization LoftQ approximates (omitted: 4 bits, "
        "one iteration). PEFT `loftq_config`.",
    )
    eva: EvaSettings | None = Field(
        default=None,
        description="With `init: eva`: how the ranks and components are found (omitted: "
        "PEFT's defaults). PEFT `eva_config`.",
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
    layer_replication: Annotated[tuple[LayerRange, ...], Field(min_length=1)] | None = Field(
        default=None,
        description="Rebuild the model's stack of layers from these `[start, end)` ranges of "
        "its layers, in order: `[[0, 4], [2, 5]]` on 5 layers gives layers 0 1 2 3 2 3 4. The "
        "copies share the base weights and each gets its own adapter; `targets`, `layers` and "
        "the patterns name modules of the new stack. Llama-, BERT- and Falcon-like models; "
        "every adapter of a spec gives the same ranges. PEFT `layer_replication`.",
    )
    trainable_token_indices: TrainableTokenIndices | None = Field(
        default=None,
        description="Train these rows of embedding layers beside the LoRA targets (the "
        "`trainable_tokens` method's rows): a list of token ids for the model's input "
        "embedding, or a mapping from a module name (a plain suffix of its path, as in "
        "PEFT) to its token ids, e.g. `{embed_tokens: [0, 1]}`. An output head tied to the "
        "input embedding reads the same rows (unless the mapping gives it other ids). A "
        "module cannot also be a LoRA target or in `modules_to_save`. PEFT "
        "`trainable_token_indices`.",
    )
    ensure_weight_tying: StrictBool = Field(
        default=False,
        description="Keep the adapter on layers tied to the input embedding "
        "(`tie_word_embeddings`) tied too: when `targets` names an embedding layer "
        "(`embed_tokens` or `lm_head`), the input embedding gets the LoRA and each tied layer "
        "(the output head) a LoRA sharing its factors (`lora_A = Bᵀ`, `lora_B = Aᵀ` of the "
        "embedding's); with `trainable_token_indices` a tied head must read the same rows. "
        "PEFT `ensure_weight_tying`.",
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
        for field, init in (("loftq", "loftq"), ("eva", "eva")):
            if getattr(self, field) is not None and self.init != init:
                raise FieldError((field,), f"{field} needs init {init!r}, not {self.init!r}")
        if self.layer_replication is not None and self.init in ("pissa", "olora", "loftq"):
            raise FieldError(
                ("layer_replication",),
                f"layer_replication cannot be combined with init {self.init!r}: it rewrites "
                "the base weights, which the copies of a layer share",
            )
        if self.target_parameters is not None:
            _check_parameter_options(self)
        if self.trainable_token_indices is not None:
            _check_token_options(self)
        check_selection(
            self.targets,
            self.exclude,
            self.layers,
            self.modules_to_save,
            parameters=self.target_parameters is not None,
        )
        return self


def _check_token_options(a: LoraAdapter) -> None:
    """PEFT's refusals for ``trainable_token_indices`` that the spec alone shows."""
    if getattr(a.targets, "kind", None) == "none" and a.target_parameters is None:
        raise FieldError(
            ("trainable_token_indices",),
            "trainable_token_indices needs LoRA targets (PEFT refuses a LoRA without target "
            "modules); to train token rows alone, use method 'trainable_tokens' (PEFT "
            "TrainableTokensConfig)",
        )
    tokens = a.trainable_token_indices
    if isinstance(tokens, Mapping):
        both = sorted(set(tokens) & set(a.modules_to_save))
        if both:
            raise FieldError(
                ("trainable_token_indices",),
                f"{both[0]!r} is both in modules_to_save and trainable_token_indices: train "
                "the embedding in full or some of its rows, not both (as in PEFT)",
            )


def _check_parameter_options(a: LoraAdapter) -> None:
    """PEFT's ``ParamWrapper`` refusals, as spec errors (they apply to the whole adapter)."""
    refused = {
        "lora_dropout": a.lora_dropout > 0,
        "lora_bias": a.lora_bias,
        "use_dora": a.use_dora,
        "fan_in_fan_out": a.fan_in_fan_out is True,
        "alora_invocation_tokens": a.alora_invocation_tokens is not None,
    }
    for name, bad in refused.items():
        if bad:
            raise FieldError(
                ("target_parameters",),
                f"target_parameters cannot be combined with {name} (as in PEFT: the update "
                "is added to the weight, not to a layer's output)",
            )
    if a.init not in ("default", "gaussian", "random"):
        raise FieldError(
            ("target_parameters",),
            f"target_parameters cannot be combined with init {a.init!r} "
            "(default, gaussian or random)",
        )


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


# Keys taken as they are when set (the spec validates them).
_AS_IS: tuple[str, ...] = ("alora_invocation_tokens", "target_parameters", "layer_replication")
_AS_IS += ("trainable_token_indices", "ensure_weight_tying")

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
    if a.init == "loftq":
        loftq = a.loftq or LoftqSettings()
        cfg["loftq_config"] = {"loftq_bits": loftq.bits, "loftq_iter": loftq.iterations}
    if a.init == "eva":  # PEFT's EvaConfig, in its field order
        cfg["eva_config"] = (a.eva or EvaSettings()).model_dump()
    if a.target_parameters is not None:
        cfg["target_parameters"] = list(a.target_parameters)
    if a.layer_replication is not None:
        cfg["layer_replication"] = [list(pair) for pair in a.layer_replication]
    tokens = a.trainable_token_indices
    if tokens is not None:
        cfg["trainable_token_indices"] = (
            {k: list(v) for k, v in tokens.items()} if isinstance(tokens, Mapping) else list(tokens)
        )
    cfg["ensure_weight_tying"] = a.ensure_weight_tying
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
        elif key in ("loftq_config", "eva_config"):
            _init_settings(key, value, cfg.get("init_lora_weights"), adapter, bad)
        elif key in _AS_IS:
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
    elif value in ("gaussian", "pissa", "olora", "orthogonal", "mica", "loftq", "eva"):
        adapter["init"] = value
    elif isinstance(value, str) and _PISSA_NITER.fullmatch(value):
        adapter["init"] = "pissa"
        adapter["pissa_niter"] = int(value.rsplit("_", 1)[1])
    else:
        bad("init_lora_weights", f"init_lora_weights={value!r} is not supported by adaptc")


# PEFT's LoftQConfig keys -> the spec's LoftqSettings fields
_LOFTQ_KEYS = {"loftq_bits": "bits", "loftq_iter": "iterations"}


def _init_settings(key: str, value: Any, init: Any, adapter: dict[str, Any], bad: Bad) -> None:
    """``loftq_config`` / ``eva_config``: kept with their init; PEFT ignores them otherwise."""
    own = "loftq" if key == "loftq_config" else "eva"
    if init != own or value is None:
        if init == own == "loftq":  # PEFT's LoraConfig refuses it
            bad(key, "`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
        return
    if not isinstance(value, Mapping):
        bad(key, f"{key} must be a mapping, not {type(value).__name__}")
    elif own == "eva":
        adapter["eva"] = dict(value)
    elif not value:
        bad(key, "`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
    else:
        unknown = sorted(set(value) - set(_LOFTQ_KEYS))
        if unknown:
            bad(key, f"{key} has unknown keys {unknown} (LoftQConfig has {list(_LOFTQ_KEYS)})")
        adapter["loftq"] = {_LOFTQ_KEYS[k]: v for k, v in value.items() if k in _LOFTQ_KEYS}


SPEC = MethodSpec(
    name="lora",
    model=LoraAdapter,
    peft_type="LORA",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_keys={
        **PEFT_KEYS,
        "init": "init_lora_weights",
        "pissa_niter": "init_lora_weights",
        "loftq": "loftq_config",
        "eva": "eva_config",
    },
)
