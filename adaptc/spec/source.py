"""Reading spec files: bounded, safe, and with a position for every value.

YAML is composed into ruamel's node tree (which carries line and column marks) and
turned into plain Python data here, so that nothing but ``str``, ``int``, ``float``,
``bool``, ``None``, ``list`` and ``dict`` ever reaches validation. Along the way:

- files over :data:`MAX_BYTES`, non-UTF-8 bytes, empty files and directories are refused;
- only the core YAML tags are accepted (``!!python/...`` and custom tags are errors);
- aliases are expanded under a budget of :data:`MAX_NODES` values and :data:`MAX_DEPTH`
  levels, so an alias bomb or a self-referencing alias fails fast;
- duplicate keys are errors that name both lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from adaptc.spec.errors import SpecError, SpecIssue

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "Document", "parse_text", "read_document"]

MAX_BYTES = 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64

Loc = tuple[str | int, ...]
_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{t}" for t in ("str", "int", "float", "bool", "null")}


@dataclass
class Document:
    """Parsed spec data with the 1-based (line, column) of each key and value."""

    path: str | None
    data: Any
    key_pos: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    value_pos: dict[Loc, tuple[int, int]] = field(default_factory=dict)

    def position(self, loc: Loc, *, key: bool = False) -> tuple[int, int] | None:
        """Where ``loc`` is written; falls back to the nearest enclosing value."""
        if key and loc in self.key_pos:
            return self.key_pos[loc]
        while True:
            if loc in self.value_pos:
                return self.value_pos[loc]
            if loc in self.key_pos:
                return self.key_pos[loc]
            if not loc:
                return None
            loc = loc[:-1]

    def issue(self, loc: Loc, field_path: str, message: str, *, key: bool = False) -> SpecIssue:
        pos = self.position(loc, key=key)
        line, col = pos if pos else (None, None)
        return SpecIssue(self.path, line, col, field_path, message)


def read_document(path: str | Path) -> Document:
    """Read and parse one spec file (YAML, or JSON when it ends in ``.json``)."""
    p = Path(path)
    name = str(path)

    def fail(message: str, line: int | None = None, col: int | None = None) -> SpecError:
        return SpecError([SpecIssue(name, line, col, "file", message)])

    if not p.exists():
        raise fail("no such file")
    if p.is_dir():
        raise fail("is a directory, not a spec file")
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise fail(f"file is {_human(size)}; a spec file is at most {_human(MAX_BYTES)}")
        with p.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise fail(f"file is larger than {_human(MAX_BYTES)}, the limit for a spec file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise fail(f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", line, col) from None
    return parse_text(text, name, as_json=p.suffix.lower() == ".json")


def parse_text(text: str, path: str | None = None, *, as_json: bool = False) -> Document:
    """Parse spec text; raise :class:`SpecError` with a position on any problem."""
    if not text.strip():
        raise SpecError([SpecIssue(path, None, None, "file", "file is empty")])
    if as_json:
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError([SpecIssue(path, exc.lineno, exc.colno, "json", exc.msg)]) from None
        except RecursionError:
            raise SpecError([SpecIssue(path, None, None, "json", "nested too deeply")]) from None
    try:
        node = YAML(typ="safe", pure=True).compose(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        msg = str(exc.problem or exc.context or "invalid YAML").strip()
        if "block" in msg or "mapping values are not allowed" in msg:
            msg += " (check the indentation, and the space after ':')"
        raise SpecError([SpecIssue(path, line, col, "yaml", msg)]) from None
    except YAMLError as exc:
        msg = str(exc).strip().splitlines()[0]
        raise SpecError([SpecIssue(path, None, None, "yaml", msg)]) from None
    except RecursionError:
        raise SpecError([SpecIssue(path, None, None, "yaml", "nested too deeply")]) from None
    if node is None:
        raise SpecError([SpecIssue(path, None, None, "file", "file is empty (only comments)")])
    doc = Document(path, None)
    doc.data = _Builder(doc).build(node, (), 0)
    return doc


class _Builder:
    """Turns a ruamel node tree into plain data, recording positions and enforcing limits."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()  # nodes being built: an alias back to one is a cycle
        self.constructor = YAML(typ="safe", pure=True).constructor

    def fail(self, node: Node, loc: Loc, message: str) -> SpecError:
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        return SpecError([SpecIssue(self.doc.path, line, col, _dotted(loc) or "yaml", message)])

    def build(self, node: Node, loc: Loc, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(node, loc[:2], f"expands to more than {MAX_NODES} values via aliases")
        if depth > MAX_DEPTH:
            raise self.fail(node, loc[:2], f"nested more than {MAX_DEPTH} levels deep")
        if id(node) in self.active:
            raise self.fail(
                node, loc, "recursive alias: this anchored node contains an alias to itself"
            )
        self.active.add(id(node))
        try:
            return self.build_node(node, loc, depth)
        finally:
            self.active.discard(id(node))

    def build_node(self, node: Node, loc: Loc, depth: int) -> Any:
        self.doc.value_pos.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, ScalarNode):
            return self.scalar(node, loc)
        if isinstance(node, SequenceNode):
            self.check_tag(node, loc, f"{_CORE}seq")
            items = []
            for i, child in enumerate(node.value):
                self.doc.key_pos.setdefault(
                    (*loc, i), (child.start_mark.line + 1, child.start_mark.column + 1)
                )
                items.append(self.build(child, (*loc, i), depth + 1))
            return items
        if isinstance(node, MappingNode):
            self.check_tag(node, loc, f"{_CORE}map")
            return self.mapping(node, loc, depth)
        raise self.fail(node, loc, f"unsupported YAML node {type(node).__name__}")

    def check_tag(self, node: Node, loc: Loc, expected: str) -> None:
        if node.tag != expected:
            raise self.fail(node, loc, f"unsupported YAML tag {_short_tag(node.tag)!r}")

    def scalar(self, node: ScalarNode, loc: Loc) -> Any:
        if node.tag == f"{_CORE}timestamp":
            return node.value  # a date-like string stays a string
        if node.tag not in _SCALAR_TAGS:
            raise self.fail(node, loc, f"unsupported YAML tag {_short_tag(node.tag)!r}")
        value = self.constructor.construct_object(node, deep=True)
        return value

    def mapping(self, node: MappingNode, loc: Loc, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merged: list[tuple[Node, Node]] = []
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == f"{_CORE}merge":
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for src in sources:
                    if not isinstance(src, MappingNode):
                        raise self.fail(src, loc, "a merge key (<<) must refer to a mapping")
                    merged.extend(src.value)
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                raise self.fail(key_node, loc, "mapping keys must be plain scalars")
            key = str(self.constructor.construct_object(key_node, deep=True))
            line = key_node.start_mark.line + 1
            if key in seen:
                raise self.fail(
                    key_node, (*loc, key), f"duplicate key {key!r} (first at line {seen[key]})"
                )
            seen[key] = line
            child = (*loc, key)
            self.doc.key_pos[child] = (line, key_node.start_mark.column + 1)
            result[key] = self.build(value_node, child, depth + 1)
        for key_node, value_node in merged:  # explicit keys win over merged ones
            key = str(self.constructor.construct_object(key_node, deep=True))
            if key not in result:
                self.doc.key_pos.setdefault(
                    (*loc, key), (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                )
                result[key] = self.build(value_node, (*loc, key), depth + 1)
        return result


def _short_tag(tag: str | None) -> str:
    tag = tag or "?"
    return "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def _human(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")
