"""The parts of the spec every adapter method shares: field types, target selectors, errors.

Methods' spec models (``adaptc/methods/<name>/spec.py``) are built from these; the spec
envelope (:class:`adaptc.spec.model.Spec`) holds one of them per adapter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
)

from adaptc.spec.regex import check_pattern

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "LAYER_TYPES",
    "RESERVED_ADAPTER_NAMES",
    "TASK_TYPES",
    "AdapterName",
    "AllLinearTargets",
    "Dropout",
    "ExcludeField",
    "Exclusions",
    "FanInFanOutField",
    "FieldError",
    "LayerSelection",
    "ModuleName",
    "ModuleNames",
    "ModulesToSaveField",
    "NameList",
    "NameTargets",
    "NoTargets",
    "PositiveInt",
    "PositiveNumber",
    "Regex",
    "RegexTargets",
    "Targets",
    "TargetsField",
    "TokenIndices",
    "TypeTargets",
    "check_selection",
    "closed",
]

ADAPTER_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
RESERVED_ADAPTER_NAMES = frozenset({"__base__"})
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
    "bnb.Linear8bitLt",
    "bnb.Linear4bit",
    "torchao.Linear",
    "quanto.QLinear",
    "hqq.HQQLinear",
)


class FieldError(ValueError):
    """A cross-field rule failed; ``loc`` is the field (relative to the model) to blame."""

    def __init__(self, loc: tuple[str | int, ...], message: str, *, at_key: bool = False) -> None:
        super().__init__(message)
        self.loc = loc
        self.at_key = at_key  # point at the key (e.g. an adapter's name), not its value


def closed(title: str | None = None) -> ConfigDict:
    return ConfigDict(frozen=True, extra="forbid", title=title)


def _safe_regex(value: str) -> str:
    problem = check_pattern(value)
    if problem:
        raise ValueError(problem)
    return value


def _int_if_integral(value: float) -> float:
    # keep `lora_alpha: 32` an int, as PEFT writes it
    return int(value) if float(value).is_integer() else value


def no_duplicates(values: tuple[str, ...]) -> tuple[str, ...]:
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
    AfterValidator(no_duplicates),
]
AdapterName = Annotated[StrictStr, StringConstraints(pattern=ADAPTER_NAME_PATTERN)]


class NameTargets(BaseModel):
    """PEFT's list form: a module matches when its name equals an entry or ends with ``.entry``."""

    model_config = closed()
    kind: Literal["names"] = Field(description="Select modules by name suffix.")
    names: NameList = Field(
        description="Module names or dotted suffixes, e.g. `[q_proj, v_proj]`: a module is "
        "targeted when its full name equals an entry or ends with `.` + entry."
    )


class RegexTargets(BaseModel):
    """PEFT's string form: the full module name must match the pattern (``re.fullmatch``)."""

    model_config = closed()
    kind: Literal["regex"] = Field(description="Select modules by regular expression.")
    pattern: Regex = Field(
        description="Python regular expression that must match the *whole* module name, "
        r"e.g. `.*decoder.*\.(q|v)$`. Nested quantifiers such as `(a+)+` are refused."
    )


class AllLinearTargets(BaseModel):
    """Every linear layer (``nn.Linear``, transformers ``Conv1D``) except the output head."""

    model_config = closed()
    kind: Literal["all-linear"] = Field(
        description="Select every linear layer except the model's output head, as PEFT's "
        "`target_modules='all-linear'`."
    )


class TypeTargets(BaseModel):
    """Every module of the listed layer types (an adaptc extension: PEFT has no such selector)."""

    model_config = closed()
    kind: Literal["types"] = Field(description="Select modules by layer type.")
    types: Annotated[
        tuple[Literal[LAYER_TYPES], ...],  # type: ignore[valid-type]
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
        AfterValidator(no_duplicates),
    ] = Field(description="Layer types to target, e.g. `[nn.Linear, transformers.Conv1D]`.")


class NoTargets(BaseModel):
    """No module at all: the adapter adapts only the parameters it names (PEFT's
    ``target_modules=[]`` with ``target_parameters``)."""

    model_config = closed()
    kind: Literal["none"] = Field(
        description="Select no module; the adapter needs `target_parameters` then."
    )


Targets = Annotated[
    NameTargets | RegexTargets | AllLinearTargets | TypeTargets | NoTargets,
    Field(discriminator="kind"),
]
Exclusions = Annotated[NameTargets | RegexTargets, Field(discriminator="kind")]


class LayerSelection(BaseModel):
    """Restrict targets to layer indices (PEFT's ``layers_to_transform``, ``layers_pattern``)."""

    model_config = closed()
    indices: Annotated[
        tuple[Annotated[StrictInt, Field(ge=0)], ...],
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
    ] = Field(description="Layer indices to adapt, e.g. `[0, 1, 2]` (PEFT `layers_to_transform`).")
    pattern: tuple[Regex, ...] | None = Field(
        default=None,
        description="Name(s) of the layer list, e.g. `[layers]` or `[h]` (PEFT `layers_pattern`); "
        "when omitted, the first numbered segment of the module name is the layer index.",
    )


Dropout = Annotated[float, Field(ge=0, lt=1, strict=True, allow_inf_nan=False)]


def unique_indices(values: tuple[int, ...]) -> tuple[int, ...]:
    """``values`` when no index repeats (a token row trained twice has no defined value)."""
    seen: set[int] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"token index {v} is listed twice")
        seen.add(v)
    return values


# Token ids whose embedding rows train (trainable tokens; LoRA's trainable_token_indices)
TokenIndices = Annotated[
    tuple[Annotated[StrictInt, Field(ge=0)], ...],
    Field(min_length=1, json_schema_extra={"uniqueItems": True}),
    AfterValidator(unique_indices),
]
ModuleNames = Annotated[
    tuple[ModuleName, ...],
    Field(json_schema_extra={"uniqueItems": True}),
    AfterValidator(no_duplicates),
]


def check_selection(
    targets: Targets | None,
    exclude: Exclusions | None,
    layers: LayerSelection | None,
    modules_to_save: tuple[str, ...],
    *,
    parameters: bool = False,
) -> None:
    """The cross-field rules of target selection every method shares (raises FieldError);
    ``parameters``: the adapter also targets parameters (LoRA's ``target_parameters``)."""
    if isinstance(targets, NoTargets) and not parameters:
        raise FieldError(
            ("targets", "kind"), "targets kind 'none' selects nothing: it needs target_parameters"
        )
    if layers is not None and isinstance(targets, RegexTargets):
        raise FieldError(
            ("layers",),
            "layers cannot be combined with a regex target: put the layer index in the pattern",
        )
    target_names = set(targets.names) if isinstance(targets, NameTargets) else set()
    if isinstance(exclude, NameTargets):
        both = sorted(target_names & set(exclude.names))
        if both:
            raise FieldError(
                ("exclude", "names"), f"{both[0]!r} is both in targets.names and exclude.names"
            )
    both = sorted(target_names & set(modules_to_save))
    if both:
        raise FieldError(
            ("modules_to_save",), f"{both[0]!r} is both in targets.names and modules_to_save"
        )


# The selection fields every method's model has, each described once (`x: TargetsField = None`).
TargetsField = Annotated[
    Targets | None,
    Field(
        description="Which modules get the adapter; one of the tagged selectors `names`, "
        "`regex`, `all-linear`, `types`. When omitted, PEFT's default targets for the model "
        "type are used."
    ),
]
ExcludeField = Annotated[
    Exclusions | None,
    Field(
        description="Modules never adapted even if `targets` selects them (`names` or `regex`; "
        "PEFT `exclude_modules`)."
    ),
]
ModulesToSaveField = Annotated[
    ModuleNames,
    Field(
        description="Modules trained in full and saved with the adapter (e.g. a classifier "
        "head); matched by name suffix. The compiled model holds trainable copies."
    ),
]
FanInFanOutField = Annotated[
    StrictBool,
    Field(
        description="The target stores its weight as (fan_in, fan_out). transformers' "
        "`Conv1D` is detected and handled automatically, as in PEFT."
    ),
]
