"""The adapter spec: frozen, closed pydantic models.

A spec says *what* adapter a user wants; the planner and the compiler decide *how*.
Every field is described once, in ``Field(description=...)``: that text feeds the JSON
Schema (``adaptc schema``), the reference in ``docs/spec.md`` and the CLI help.

Rules that span several fields are validators that raise :class:`FieldError` (a
``ValueError``), so pydantic keeps the location and the loader can point at the line.
The adapters' own models belong to their methods (``adaptc/methods/<name>/spec.py``,
registered in :data:`adaptc.methods.NAMES`); ``Spec.adapters`` holds one of them per
adapter, chosen by its ``method`` field (``lora`` when omitted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    StringConstraints,
    Tag,
    model_validator,
)

from adaptc.spec.compile_options import CompileOptions
from adaptc.spec.fields import (
    ADAPTER_NAME_PATTERN,
    LAYER_TYPES,
    RESERVED_ADAPTER_NAMES,
    TASK_TYPES,
    AdapterName,
    AllLinearTargets,
    FieldError,
    LayerSelection,
    NameTargets,
    NoTargets,
    RegexTargets,
    TypeTargets,
    closed,
)
from adaptc.spec.method import method_spec, method_specs
from adaptc.spec.quantization import Quantization

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "LAYER_TYPES",
    "TASK_TYPES",
    "AdapterSettings",
    "AllLinearTargets",
    "BaseModelRef",
    "CompileOptions",
    "FieldError",
    "LayerSelection",
    "LoraAdapter",
    "NameTargets",
    "NoTargets",
    "RegexTargets",
    "Spec",
    "TypeTargets",
]

_RESERVED_SORTED: list[Any] = sorted(RESERVED_ADAPTER_NAMES)


def _method_of(value: Any) -> str:
    if isinstance(value, dict):
        method = value.get("method", "lora")
        return method if isinstance(method, str) else repr(method)
    return str(getattr(value, "method", "lora"))


# One adapter's settings: the model of its method (`method` is the tag; `lora` when
# omitted). The union is built from the registry when this module is imported, so a type
# checker sees Any; typed code imports a method's model from its package.
if TYPE_CHECKING:
    AdapterSettings = Any
    LoraAdapter: type[BaseModel]
else:
    AdapterSettings = Annotated[
        Union[tuple(Annotated[m.model, Tag(m.name)] for m in method_specs())],  # noqa: UP007
        Discriminator(_method_of),
    ]
    LoraAdapter = method_specs()[0].model  # the default method's (for `adaptc.spec` users)


def _ranges(ranges: Any) -> str:
    return "none" if ranges is None else str([list(pair) for pair in ranges])


def _version_is_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected the integer 1, got {type(value).__name__} {value!r}")
    return value


class BaseModelRef(BaseModel):
    """The model an adapter is meant for."""

    model_config = closed()
    name: Annotated[StrictStr, StringConstraints(min_length=1)] = Field(
        description="Hub id, local directory, `config.json` path, or `package.module:factory`."
    )
    revision: Annotated[StrictStr, StringConstraints(min_length=1)] | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of `name`."
    )
    quantization: Quantization | None = Field(
        default=None,
        description="Load the base quantized (QLoRA): one of `method: bitsandbytes`, "
        "`torchao`, `hqq`, `quanto`, with that backend's settings.",
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
    adapters: dict[AdapterName, AdapterSettings] = Field(
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
    compile: CompileOptions = Field(
        default_factory=CompileOptions,
        description="Graph passes for training and unmerged inference, each exact: "
        "`dropout` and `rematerialize` (on by default), `fuse_siblings` and `fuse_add` (off).",
    )

    @model_validator(mode="after")
    def _reserved_names(self) -> Spec:
        for name in self.adapters:
            if name in RESERVED_ADAPTER_NAMES:
                raise FieldError(
                    ("adapters", name), f"adapter name {name!r} is reserved", at_key=True
                )
        return self

    @model_validator(mode="after")
    def _one_layer_stack(self) -> Spec:
        """The adapters of a model share its layers: they replicate them all alike."""
        names = list(self.adapters)
        ranges = [getattr(a, "layer_replication", None) for a in self.adapters.values()]
        for name, mine in zip(names[1:], ranges[1:], strict=True):
            if mine != ranges[0]:
                raise FieldError(
                    ("adapters", name, "layer_replication"),
                    f"layer_replication must be the same in every adapter ({names[0]!r} has "
                    f"{_ranges(ranges[0])}, {name!r} {_ranges(mine)}): they share the model's "
                    "layers",
                )
        return self

    @property
    def quantization(self) -> Any:
        """``base_model.quantization``, or None (no base model, or a float one)."""
        return self.base_model.quantization if self.base_model is not None else None

    def adapter(self, name: str | None = None) -> Any:
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

    def with_adapters(self, adapters: Mapping[str, Any]) -> Spec:
        """This spec carrying ``adapters`` (validated settings, in order) instead. None at
        all is the state of a compiled model whose last adapter was deleted, never a spec
        a user writes."""
        if not adapters:
            return self.model_copy(update={"adapters": {}})
        return Spec.model_validate({**self.model_dump(by_alias=True), "adapters": dict(adapters)})

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields that differ from their defaults (what a user would write)."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    def to_peft_config(
        self,
        adapter: str | None = None,
        *,
        target_modules: list[str] | None = None,
        inference_mode: bool = False,
        settings: Any = None,
    ) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT would write for one adapter of this spec.

        ``target_modules`` overrides the targets (the compiler passes the resolved names
        for selectors PEFT cannot express, such as ``kind: types``); ``settings``, the
        adapter's (with the defaults the plan resolved, as PEFT records them)."""
        a = self.adapter(adapter) if settings is None else settings
        cfg = method_spec(a.method).to_peft(a, target_modules)
        cfg["task_type"] = self.task_type
        cfg["inference_mode"] = inference_mode
        if self.base_model is not None:
            cfg["base_model_name_or_path"] = self.base_model.name
            cfg["revision"] = self.base_model.revision
        return cfg
