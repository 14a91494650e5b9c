"""Errors a user sees: one line each, ``path:line:column: field.path: message``."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Tag, ValidationError
from pydantic_core import ErrorDetails

__all__ = ["SpecError", "SpecIssue", "SpecWarning", "issues_from_validation_error", "one_line"]

Loc = tuple[str | int, ...]
MAX_ISSUES = 100  # errors reported for one file; the rest are counted in one more line
# Segments pydantic adds to a location that are not keys in the user's file.
_INTERNAL_SEGMENT = re.compile(r"^(\[key\]|constrained-\w+|function-\w+\[.*\]|\w+-union\[.*\])$")


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec, with where it is."""

    file: str | None
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        return self.render()

    def render(self, severity: str | None = None) -> str:
        """``file:line:col: [severity: ]field: message``, on one line whatever the key."""
        where = [one_line(str(p)) for p in (self.file, self.line, self.column) if p is not None]
        parts = [":".join(where)] if where else []
        if severity:
            parts.append(severity)
        parts += [one_line(self.field), one_line(self.message)]
        return ": ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
        }


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``), so
    that a key such as ``"a\\nb"`` cannot split an issue over two lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SpecWarning(UserWarning):
    """A spec loaded, but something in its file deserves a look (e.g. a reused YAML anchor).

    ``load_spec`` reports each such :class:`SpecIssue` as one of these, via :mod:`warnings`.
    """

    def __init__(self, issue: SpecIssue) -> None:
        super().__init__(str(issue))
        self.issue = issue


class SpecError(ValueError):
    """A spec could not be read or is invalid; ``issues`` holds every problem found."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


# PEFT's LoraConfig names that adaptc spells differently (used for "did you mean").
PEFT_RENAMES = {
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "init_lora_weights": "init",
    "layers_to_transform": "layers",
    "layers_pattern": "layers",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "rank": "r",
}


def issues_from_validation_error(
    exc: ValidationError, root: type[BaseModel], doc: Any | None = None
) -> list[SpecIssue]:
    """Translate pydantic's errors into located one-line issues (deduplicated, in order)."""
    out: list[SpecIssue] = []
    seen: set[tuple[str, str]] = set()
    errors = exc.errors(include_url=False)
    cleaned = [_clean_loc(root, err["loc"]) for err in errors]
    for err, (loc, model, parent) in zip(errors, cleaned, strict=True):
        if err["type"] == "too_short" and any(
            len(other) > len(loc) and other[: len(loc)] == loc for other, *_ in cleaned
        ):
            continue  # pydantic also counts the items that failed as missing: say it once
        extra = err.get("ctx", {}).get("error")
        at_key = False
        if extra is not None and hasattr(extra, "loc"):  # FieldError from a cross-field rule
            loc = (*loc, *extra.loc)
            at_key = bool(getattr(extra, "at_key", False))
        dotted = ".".join(str(p) for p in loc) or "(root)"
        message = _message(err, loc, model, parent, root)
        if (dotted, message) in seen:
            continue
        seen.add((dotted, message))
        key = at_key or (
            err["type"] in ("extra_forbidden", "string_pattern_mismatch") and _is_key(err)
        )
        if doc is not None:
            out.append(doc.issue(loc, dotted, message, key=key or err["type"] == "missing"))
        else:
            out.append(SpecIssue(None, None, None, dotted, message))
    out.sort(key=lambda i: (i.line or 0, i.column or 0))
    if len(out) > MAX_ISSUES:  # 20,000 bad names are one mistake made 20,000 times
        first_unshown = out[MAX_ISSUES]
        more = SpecIssue(
            first_unshown.file,
            first_unshown.line,
            first_unshown.column,
            first_unshown.field,
            f"and {len(out) - MAX_ISSUES} more errors, not shown",
        )
        out = [*out[:MAX_ISSUES], more]
    return out


def _is_key(err: ErrorDetails) -> bool:
    return err["type"] == "extra_forbidden" or "[key]" in err["loc"]


def _clean_loc(root: type[BaseModel], raw: Iterable[str | int]) -> tuple[Loc, Any, Any]:
    """Drop pydantic's internal segments (union tags, ``[key]``, validator names); also the
    model at the end of the path and the one holding its last segment (a tagged union's
    member, which the cleaned path alone no longer names)."""
    loc: list[str | int] = []
    tp: Any = root
    parent: Any = None
    for seg in raw:
        tagged = _tagged_members(tp).get(seg)
        if tagged is not None:  # a callable discriminator's tag (a list or a mapping form)
            tp = tagged
            continue
        tp = _unwrap(tp)
        if typing.get_origin(tp) is dict:  # a user's key, whatever it looks like
            loc.append(seg)
            parent, tp = tp, _child_type(tp, seg)
            continue
        members = _union_members(tp)
        if members is not None:
            chosen = _member_for_tag(members, seg)
            if chosen is not None:  # a discriminator tag in the path: not a key in the file
                tp = chosen
                continue
        if isinstance(seg, str) and _INTERNAL_SEGMENT.match(seg):
            continue
        if seg in _kind_values(tp) and _child_type(tp, seg) is None:  # a one-member union's tag
            continue
        loc.append(seg)
        parent, tp = tp, _child_type(tp, seg)
    return tuple(loc), _unwrap(tp), _unwrap(parent)


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _tagged_members(tp: Any) -> dict[Any, Any]:
    """The members of a union tagged with pydantic's ``Tag``, by tag (else empty)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                break
            tp = args[0]
        else:
            return {}
    found: dict[Any, Any] = {}
    for arg in typing.get_args(tp):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, Tag):
                found[meta.tag] = arg
    return found


def _union_members(tp: Any) -> list[Any] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [_unwrap(a) for a in typing.get_args(tp)]
    return None


def _member_for_tag(members: list[Any], seg: str | int) -> Any:
    for m in members:
        if seg in _kind_values(m):
            return m
    return None


def _child_type(tp: Any, seg: str | int) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, info in tp.model_fields.items():
            if seg in (name, info.alias):
                return info.annotation
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (tuple, list) and args:
        return args[0]
    return None


def _fields(model: Any) -> list[str]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [info.alias or name for name, info in model.model_fields.items()]
    return []


def _model_at(root: type[BaseModel], loc: Loc) -> Any:
    tp: Any = root
    for seg in loc:
        tp = _child_type(_unwrap(tp), seg)
    return _unwrap(tp)


def _message(err: ErrorDetails, loc: Loc, model: Any, parent: Any, root: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx", {})
    value = err.get("input")
    if kind == "extra_forbidden":
        return _unknown_field(str(loc[-1]), parent, root)
    if kind == "missing":
        return "missing required field"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        members = _union_members(_unwrap(_child_type(parent, loc[-1])))
        if not tags:
            tags = [str(t) for m in members or [] for t in _kind_values(m)]
        field = next((f for m in members or [] if (f := _tag_field(m))), "kind")
        options = ", ".join(tags)
        if kind == "union_tag_not_found":
            return f"missing {field!r} (one of: {options})"
        tag = str(ctx.get("tag"))
        what = field
        if field == "method":  # an adapter's method, or a quantization backend
            what = "quantization method" if loc[-1] == "quantization" else "adapter method"
        return f"unknown {what} {_clipped(tag)}; expected one of: {options}" + _did_you_mean(
            tag, tags
        )
    if kind == "literal_error" and loc == ("version",):
        return f"unsupported spec version {_clipped(value)}; this adaptc reads version 1"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        expected = str(ctx.get("expected", ""))
        hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
        return f"expected {expected}, got {_describe(value)}" + hint
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "string_pattern_mismatch" and "[key]" in err["loc"] and loc[:1] == ("adapters",):
        return (
            f"invalid adapter name {_clipped(value)}: use letters, digits, '_' and '-', "
            "starting with a letter or '_' (at most 64 characters)"
        )
    if kind == "string_pattern_mismatch":
        return (
            f"invalid name {_clipped(value)}: no spaces, no empty or leading/trailing '.' segments"
        )
    simple = {
        "int_type": "expected an integer",
        "float_type": "expected a number",
        "bool_type": "expected true or false",
        "string_type": "expected a string",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
        "model_attributes_type": "expected a mapping",
        "tuple_type": "expected a list",
        "list_type": "expected a list",
        "finite_number": "expected a finite number",
    }
    if kind in simple:
        return f"{simple[kind]}, got {_describe(value)}" + _shape_hint(model, value)
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", "≥"),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "≤"),
    }
    if kind in bounds:
        key, op = bounds[kind]
        return f"must be {op} {ctx.get(key)}, got {value!r}"
    if kind == "too_short":
        what = "entry" if isinstance(value, dict) else "item"
        return f"must have at least {ctx.get('min_length')} {what}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    msg = err["msg"]
    return msg[:1].lower() + msg[1:]


def _shape_hint(model: Any, value: Any) -> str:
    """For a scalar or list where a mapping belongs: show the mapping that was meant."""
    members = _union_members(model) or [model]
    for m in members:
        if not (isinstance(m, type) and issubclass(m, BaseModel)):
            continue
        required = [n for n, f in m.model_fields.items() if f.is_required() and n != "kind"]
        kinds = _kind_values(m)
        if isinstance(value, list) and kinds and len(required) == 1:
            items = ", ".join(str(v) for v in value[:4])
            return f"; write {{kind: {kinds[0]}, {required[0]}: [{items}]}}"
        if isinstance(value, str) and not kinds and len(required) == 1:
            return f"; write {{{required[0]}: {value}}}"
    return ""


_TAG_FIELDS = ("kind", "method")  # the discriminators of the spec's tagged unions


def _tag_field(model: Any) -> str | None:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return next((f for f in _TAG_FIELDS if f in model.model_fields), None)
    return None


def _kind_values(model: Any) -> tuple[Any, ...]:
    field = _tag_field(model)
    if field is None:
        return ()
    return typing.get_args(model.model_fields[field].annotation)


def _unknown_field(key: str, model: Any, root: type[BaseModel]) -> str:
    fields = _fields(model)
    message = f"unknown field {_clipped(key)}"
    if key in PEFT_RENAMES and PEFT_RENAMES[key] in fields:
        return f"{message}: PEFT's {key!r} is {PEFT_RENAMES[key]!r} in an adaptc spec"
    hint = _did_you_mean(key, fields)
    if hint:
        return message + hint
    close_peft = difflib.get_close_matches(key, list(PEFT_RENAMES), n=1, cutoff=0.75)
    if close_peft and PEFT_RENAMES[close_peft[0]] in fields:
        return f"{message}; did you mean {PEFT_RENAMES[close_peft[0]]!r}?"
    adapter = _unwrap(_model_at(root, ("adapters", "x")))
    adapter_fields = {f for m in _union_members(adapter) or [adapter] for f in _fields(m)}
    if model is root and (key in adapter_fields or key in PEFT_RENAMES):
        return f"{message}: adapter settings go under 'adapters: {{NAME: ...}}'"
    return message + (f" (expected one of: {', '.join(fields)})" if fields else "")


def _did_you_mean(value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    if not close:
        lowered = {o.lower().replace("-", "_"): o for o in options}
        norm = value.lower().replace("-", "_")
        close = [lowered[norm]] if norm in lowered else []
    return f"; did you mean {close[0]!r}?" if close and close[0] != value else ""


def _clipped(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 100 KB key is not repeated whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    names = {str: "string", int: "integer", float: "number", list: "list", dict: "mapping"}
    kind = names.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"
