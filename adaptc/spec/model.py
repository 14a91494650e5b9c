"""The adapter spec: frozen, closed pydantic models.

A spec says *what* adapter a user wants; the planner and the compiler decide *how*.
Every field is described once, in ``Field(description=...)``: that text feeds the JSON
Schema (``adaptc schema``), the reference in ``docs/spec.md`` and the CLI help.

Rules that span several fields are validators that raise :class:`FieldError` (a
``ValueError``), so pydantic keeps the location and the loader can point at the line.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    model_validator,
)

from adaptc.spec.regex import check_pattern

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "LAYER_TYPES",
    "TASK_TYPES",
    "AllLinearTargets",
    "BaseModelRef",
    "FieldError",
    "LayerSelection",
    "LoraAdapter",
    "NameTargets",
    "RegexTargets",
    "Spec",
    "TypeTargets",
]

ADAPTER_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
RESERVED_ADAPTER_NAMES = frozenset({"__base__"})
_RESERVED_SORTED: list[Any] = sorted(RESERVED_ADAPTER_NAMES)
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
LAYER_TYPES = (
    "nn.Linear",
    "nn.Embedding",
    "nn.Conv1d",
    "nn.Conv2d",
    "nn.Conv3d",
    "nn.MultiheadAttention",
    "transformers.Conv1D",
)


class FieldError(ValueError):
    """A cross-field rule failed; ``loc`` is the field (relative to the model) to blame."""

    def __init__(self, loc: tuple[str | int, ...], message: str, *, at_key: bool = False) -> None:
        super().__init__(message)
        self.loc = loc
        self.at_key = at_key  # point at the key (e.g. an adapter's name), not its value


def _closed(title: str | None = None) -> ConfigDict:
    return ConfigDict(frozen=True, extra="forbid", title=title)


def _safe_regex(value: str) -> str:
    problem = check_pattern(value)
    if problem:
        raise ValueError(problem)
    return value


def _int_if_integral(value: float) -> float:
    # keep `lora_alpha: 32` an int, as PEFT writes it
    return int(value) if float(value).is_integer() else value


def _no_duplicates(values: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"duplicate entry {v!r}")
        seen.add(v)
    return values


ModuleName = Annotated[
    StrictStr,
    StringConstraints(min_length=1, max_length=512, pattern=r"^[^.\s]+(\.[^.\s]+)*$"),
]
Regex = Annotated[StrictStr, StringConstraints(min_length=1), AfterValidator(_safe_regex)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
PositiveNumber = Annotated[
    float,
    Field(gt=0, strict=True, allow_inf_nan=False),
    AfterValidator(_int_if_integral),
    PlainSerializer(_int_if_integral, return_type=Any),
]
NameList = Annotated[
    tuple[ModuleName, ...],
    Field(min_length=1, json_schema_extra={"uniqueItems": True}),
    AfterValidator(_no_duplicates),
]
AdapterName = Annotated[StrictStr, StringConstraints(pattern=ADAPTER_NAME_PATTERN)]


class NameTargets(BaseModel):
    """PEFT's list form: a module matches when its name equals an entry or ends with ``.entry``."""

    model_config = _closed()
    kind: Literal["names"] = Field(description="Select modules by name suffix.")
    names: NameList = Field(
        description="Module names or dotted suffixes, e.g. `[q_proj, v_proj]`: a module is "
        "targeted when its full name equals an entry or ends with `.` + entry."
    )


class RegexTargets(BaseModel):
    """PEFT's string form: the full module name must match the pattern (``re.fullmatch``)."""

    model_config = _closed()
    kind: Literal["regex"] = Field(description="Select modules by regular expression.")
    pattern: Regex = Field(
        description="Python regular expression that must match the *whole* module name, "
        r"e.g. `.*decoder.*\.(q|v)$`. Nested quantifiers such as `(a+)+` are refused."
    )


class AllLinearTargets(BaseModel):
    """Every linear layer (``nn.Linear``, transformers ``Conv1D``) except the output head."""

    model_config = _closed()
    kind: Literal["all-linear"] = Field(
        description="Select every linear layer except the model's output head, as PEFT's "
        "`target_modules='all-linear'`."
    )


class TypeTargets(BaseModel):
    """Every module of the listed layer types (an adaptc extension: PEFT has no such selector)."""

    model_config = _closed()
    kind: Literal["types"] = Field(description="Select modules by layer type.")
    types: Annotated[
        tuple[Literal[LAYER_TYPES], ...],  # type: ignore[valid-type]
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
        AfterValidator(_no_duplicates),
    ] = Field(description="Layer types to target, e.g. `[nn.Linear, transformers.Conv1D]`.")


Targets = Annotated[
    NameTargets | RegexTargets | AllLinearTargets | TypeTargets, Field(discriminator="kind")
]
Exclusions = Annotated[NameTargets | RegexTargets, Field(discriminator="kind")]


class LayerSelection(BaseModel):
    """Restrict targets to layer indices (PEFT's ``layers_to_transform``, ``layers_pattern``)."""

    model_config = _closed()
    indices: Annotated[
        tuple[Annotated[StrictInt, Field(ge=0)], ...],
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
    ] = Field(description="Layer indices to adapt, e.g. `[0, 1, 2]` (PEFT `layers_to_transform`).")
    pattern: tuple[Regex, ...] | None = Field(
        default=None,
        description="Name(s) of the layer list, e.g. `[layers]` or `[h]` (PEFT `layers_pattern`); "
        "when omitted, the first numbered segment of the module name is the layer index.",
    )


class LoraAdapter(BaseModel):
    """One LoRA adapter: ``x ↦ W₀x + s·B·A·x``, ``s = lora_alpha / r`` (``/ √r`` with rsLoRA)."""

    model_config = _closed("LoraAdapter")

    method: Literal["lora"] = Field(default="lora", description="Adapter method. Only `lora`.")
    r: PositiveInt = Field(default=8, description="Rank of the update `B·A` (PEFT `r`).")
    lora_alpha: PositiveNumber = Field(
        default=8, description="Scaling numerator: the update is scaled by `lora_alpha / r`."
    )
    lora_dropout: Annotated[float, Field(ge=0, lt=1, strict=True, allow_inf_nan=False)] = Field(
        default=0.0, description="Dropout probability on the LoRA branch input, in [0, 1)."
    )
    targets: Targets | None = Field(
        default=None,
        description="Which modules get the adapter; one of the tagged selectors `names`, `regex`, "
        "`all-linear`, `types`. When omitted, PEFT's default targets for the model type are used.",
    )
    exclude: Exclusions | None = Field(
        default=None,
        description="Modules never adapted even if `targets` selects them (`names` or `regex`; "
        "PEFT `exclude_modules`).",
    )
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
    init: Literal["default", "gaussian", "pissa", "olora", "random"] = Field(
        default="default",
        description="Initialisation: `default` (Kaiming-uniform A, zero B: starts as a no-op), "
        "`gaussian` (normal A with std 1/r, zero B), `pissa` and `olora` (from the base weight, "
        "which they modify), `random` (both random; for tests). PEFT `init_lora_weights`.",
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
    fan_in_fan_out: StrictBool = Field(
        default=False,
        description="The target stores its weight as (fan_in, fan_out). transformers' `Conv1D` "
        "is detected and handled automatically, as in PEFT.",
    )
    modules_to_save: Annotated[
        tuple[ModuleName, ...],
        Field(json_schema_extra={"uniqueItems": True}),
        AfterValidator(_no_duplicates),
    ] = Field(
        default=(),
        description="Modules trained in full and saved with the adapter (e.g. a classifier "
        "head); matched by name suffix. The compiled model holds trainable copies.",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> LoraAdapter:
        if self.use_dora and self.lora_bias:
            raise FieldError(("lora_bias",), "lora_bias cannot be combined with use_dora")
        if self.lora_bias and self.init not in ("default", "random"):
            raise FieldError(
                ("lora_bias",), f"lora_bias needs init 'default' or 'random', not {self.init!r}"
            )
        if self.pissa_niter is not None and self.init != "pissa":
            raise FieldError(("pissa_niter",), f"pissa_niter needs init 'pissa', not {self.init!r}")
        if self.layers is not None and isinstance(self.targets, RegexTargets):
            raise FieldError(
                ("layers",),
                "layers cannot be combined with a regex target: put the layer index in the pattern",
            )
        target_names = set(self.targets.names) if isinstance(self.targets, NameTargets) else set()
        if isinstance(self.exclude, NameTargets):
            both = sorted(target_names & set(self.exclude.names))
            if both:
                raise FieldError(
                    ("exclude", "names"),
                    f"{both[0]!r} is both in targets.names and exclude.names",
                )
        both = sorted(target_names & set(self.modules_to_save))
        if both:
            raise FieldError(
                ("modules_to_save",), f"{both[0]!r} is both in targets.names and modules_to_save"
            )
        return self


def _version_is_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected the integer 1, got {type(value).__name__} {value!r}")
    return value


class BaseModelRef(BaseModel):
    """The model an adapter is meant for."""

    model_config = _closed()
    name: Annotated[StrictStr, StringConstraints(min_length=1)] = Field(
        description="Hub id, local directory, `config.json` path, or `package.module:factory`."
    )
    revision: Annotated[StrictStr, StringConstraints(min_length=1)] | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of `name`."
    )


class Spec(BaseModel):
    """An adaptc adapter spec (version 1)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", title="adaptc adapter spec", populate_by_name=True
    )

    schema_uri: StrictStr | None = Field(
        default=None,
        alias="$schema",
        description="Optional JSON Schema reference for editors; ignored by adaptc.",
    )
    version: Annotated[Literal[1], BeforeValidator(_version_is_int)] = Field(
        description="Spec format version. Always `1`."
    )
    base_model: BaseModelRef | None = Field(
        default=None, description="The model this spec is written for (optional)."
    )
    task_type: Literal[TASK_TYPES] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="PEFT task type: decides the model wrapper and the default head to save.",
    )
    adapters: dict[AdapterName, LoraAdapter] = Field(
        min_length=1,
        json_schema_extra={
            "additionalProperties": False,
            "propertyNames": {"not": {"enum": list(_RESERVED_SORTED)}},
        },
        description="Named adapters, e.g. `default:`. Names match "
        f"`{ADAPTER_NAME_PATTERN}`; `__base__` is reserved.",
    )
    merge: StrictBool = Field(
        default=False,
        description="Merge the adapters into the base weights after compiling (inference).",
    )

    @model_validator(mode="after")
    def _reserved_names(self) -> Spec:
        for name in self.adapters:
            if name in RESERVED_ADAPTER_NAMES:
                raise FieldError(
                    ("adapters", name), f"adapter name {name!r} is reserved", at_key=True
                )
        return self

    def adapter(self, name: str | None = None) -> LoraAdapter:
        """The adapter called ``name``, or the only one when ``name`` is None."""
        if name is None:
            if len(self.adapters) != 1:
                raise KeyError(
                    f"spec has {len(self.adapters)} adapters ({', '.join(self.adapters)}); name one"
                )
            return next(iter(self.adapters.values()))
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} in spec (has: {', '.join(self.adapters)})")
        return self.adapters[name]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields that differ from their defaults (what a user would write)."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    def to_peft_config(
        self,
        adapter: str | None = None,
        *,
        target_modules: list[str] | None = None,
        inference_mode: bool = False,
    ) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` contents for one adapter (see ``to_peft_config``)."""
        from adaptc.spec.peft_config import to_peft_config

        return to_peft_config(
            self, adapter, target_modules=target_modules, inference_mode=inference_mode
        )
