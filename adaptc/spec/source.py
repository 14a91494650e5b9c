"""Reading spec files: bounded, safe, and with a position for every value.

YAML is composed into ruamel's node tree (which carries line and column marks) and
turned into plain Python data here, so that nothing but ``str``, ``int``, ``float``,
``bool``, ``None``, ``list`` and ``dict`` ever reaches validation. Along the way:

- files over :data:`MAX_BYTES`, non-UTF-8 bytes, empty files and directories are refused;
- only the core YAML tags are accepted (``!!python/...`` and custom tags are errors);
- a file holds at most :data:`MAX_WRITTEN` values and nests at most :data:`MAX_DEPTH`
  levels, checked while it is composed, so a huge or deep file fails in about a second;
- aliases are expanded under a budget of :data:`MAX_NODES` values, so an alias bomb or a
  self-referencing alias fails fast;
- integers longer than :data:`MAX_INT_DIGITS` characters are refused before conversion;
- duplicate keys are errors that name both lines; a duplicate anchor, and any warning the
  YAML library raises, becomes a located warning in :attr:`Document.warnings`.

JSON is checked by :mod:`json` (syntax, with its own line and column) and then read by
the same YAML path, which gives the positions; JSON-only rules (no ``NaN``) apply there.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer, ComposerError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from adaptc.spec.errors import SpecError, SpecIssue

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_NODES",
    "MAX_WRITTEN",
    "Document",
    "parse_text",
    "read_document",
]

MAX_BYTES = 1024 * 1024
MAX_WRITTEN = 50_000  # values written in the file (a 70B model's per-module list is ~600)
MAX_NODES = 100_000  # values once aliases are expanded
MAX_DEPTH = 64
MAX_INT_DIGITS = 100

Loc = tuple[str | int, ...]
_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{t}" for t in ("str", "int", "float", "bool", "null")}
_KEY_TAGS = _SCALAR_TAGS | {f"{_CORE}timestamp"}
_MARK = re.compile(r"line (\d+), column (\d+)")


@dataclass
class Document:
    """Parsed spec data with the 1-based (line, column) of each key and value."""

    path: str | None
    data: Any
    key_pos: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    value_pos: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    warnings: list[SpecIssue] = field(default_factory=list)

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

    try:
        if not p.exists():
            raise fail("no such file")
        if p.is_dir():
            raise fail("is a directory, not a spec file")
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise fail(f"file is {_human(size)}; a spec file is at most {_human(MAX_BYTES)}")
        with p.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except SpecError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise fail(f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
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

    def fail(
        field_path: str, msg: str, line: int | None = None, col: int | None = None
    ) -> NoReturn:
        raise SpecError([SpecIssue(path, line, col, field_path, msg)]) from None

    if not text.strip():
        fail("file", "file is empty")
    if as_json:
        try:  # syntax only: the numbers are read (with limits) on the YAML path below
            json.loads(text, parse_int=len, parse_float=len, parse_constant=len)
        except json.JSONDecodeError as exc:
            fail("json", exc.msg, exc.lineno, exc.colno)
        except RecursionError:
            pass  # the YAML path below refuses it at MAX_DEPTH, with a position
    yaml = YAML(typ="safe", pure=True)
    yaml.Composer = _Composer
    yaml.max_depth = MAX_DEPTH + 1
    doc = Document(path, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            node = yaml.compose(text)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
            msg = _one_line(exc.problem or exc.context or "invalid YAML")
            if mark is not None and _after_long_key(text, mark.index):
                msg += " (a key is at most 1024 characters)"
            elif "block" in msg or "mapping values are not allowed" in msg:
                msg += " (check the indentation, and the space after ':')"
            if msg.startswith("maximum depth"):
                msg = f"nested more than {MAX_DEPTH} levels deep"
            fail("yaml", msg, line, col)
        except ReaderError as exc:
            line, col = _line_col(text, exc.position)
            if isinstance(exc.character, int):
                msg = (
                    f"control character U+{exc.character:04X} is not allowed in YAML "
                    "(write it as an escape in a double-quoted string)"
                )
            else:
                msg = _one_line(str(exc))
            fail("yaml", msg, line, col)
        except YAMLError as exc:
            fail("yaml", _one_line(str(exc)) or type(exc).__name__)
        except RecursionError:
            fail("yaml", f"nested more than {MAX_DEPTH} levels deep")
        if node is None:
            fail("file", "file is empty (only comments)")
        composer: _Composer = yaml.composer
        for anchor, first, second in composer.reused_anchors:
            doc.warnings.append(
                SpecIssue(
                    path,
                    second.line + 1,
                    second.column + 1,
                    "yaml",
                    f"duplicate anchor &{anchor} (first at line {first.line + 1}); "
                    f"aliases *{anchor} after this line refer to this one",
                )
            )
        doc.data = _Builder(doc, yaml.constructor, as_json=as_json).build(node, (), 0)
    doc.warnings.extend(_warning_issue(path, w.message) for w in caught)
    doc.warnings.sort(key=lambda i: (i.line or 0, i.column or 0))
    return doc


class _Composer(Composer):
    """ruamel's composer with a budget of written values; duplicate anchors are recorded
    (as warnings for the user) instead of being sent through :mod:`warnings` as text."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.warn_double_anchors = False
        self.written = 0
        self.reused_anchors: list[tuple[str, Any, Any]] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        self.written += 1
        if self.written > MAX_WRITTEN:
            raise ComposerError(
                None,
                None,
                f"more than {MAX_WRITTEN} values: a spec file holds at most {MAX_WRITTEN}",
                event.start_mark,
            )
        anchor = event.anchor
        if anchor is not None and not isinstance(event, AliasEvent) and anchor in self.anchors:
            self.reused_anchors.append((anchor, self.anchors[anchor].start_mark, event.start_mark))
        return super().compose_node(parent, index)


class _Builder:
    """Turns a ruamel node tree into plain data, recording positions and enforcing limits."""

    def __init__(self, doc: Document, constructor: Any, *, as_json: bool) -> None:
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()  # nodes being built: an alias back to one is a cycle
        self.constructor = constructor
        self.as_json = as_json

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
        self.doc.value_pos.setdefault(loc, _pos(node))
        if isinstance(node, ScalarNode):
            return self.scalar(node, loc)
        if isinstance(node, SequenceNode):
            self.check_tag(node, loc, f"{_CORE}seq")
            items = []
            for i, child in enumerate(node.value):
                self.doc.key_pos.setdefault((*loc, i), _pos(child))
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
        tag = node.tag
        if tag == f"{_CORE}timestamp":
            return node.value  # a date-like string stays a string
        if tag not in _SCALAR_TAGS:
            raise self.fail(node, loc, f"unsupported YAML tag {_short_tag(tag)!r}")
        if self.as_json and node.style is None and tag == f"{_CORE}str":  # NaN, Infinity
            raise self.fail(node, loc, f"{_clip(node.value)} is not valid JSON")
        if tag == f"{_CORE}int" and len(node.value) > MAX_INT_DIGITS:
            raise self.fail(
                node, loc, f"integer of {len(node.value)} characters; the limit is {MAX_INT_DIGITS}"
            )
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (ValueError, KeyError, TypeError, YAMLError):  # `!!int abc`, `!!bool maybe`
            raise self.fail(
                node, loc, f"cannot read {_clip(node.value)!r} as {_short_tag(tag)}"
            ) from None
        return _join_surrogates(value) if isinstance(value, str) else value

    def key(self, node: Node, loc: Loc) -> str:
        """A mapping key as written: ``1:``, ``true:`` and ``null:`` stay the text they are."""
        if not isinstance(node, ScalarNode) or node.tag not in _KEY_TAGS:
            raise self.fail(node, loc, "mapping keys must be plain scalars")
        return _join_surrogates(str(node.value))

    def mapping(self, node: MappingNode, loc: Loc, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merged: list[Node] = []
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == f"{_CORE}merge":
                if isinstance(value_node, SequenceNode):
                    merged.extend(value_node.value)
                else:
                    merged.append(value_node)
                continue
            key = self.key(key_node, loc)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise self.fail(
                    key_node,
                    (*loc, key),
                    f"duplicate key {_clip(key)!r} (first at line {seen[key]})",
                )
            seen[key] = line
            child = (*loc, key)
            self.doc.key_pos.setdefault(child, _pos(key_node))
            result[key] = self.build(value_node, child, depth + 1)
        for src in merged:  # explicit keys win over merged ones, earlier sources over later
            if not isinstance(src, MappingNode):
                raise self.fail(src, loc, "a merge key (<<) must refer to a mapping")
            for key, value in self.build(src, loc, depth).items():
                result.setdefault(key, value)
        return result


def _warning_issue(path: str | None, warning: Warning | str) -> SpecIssue:
    """One located line for a warning the YAML library raised while loading."""
    mark = getattr(warning, "problem_mark", None) or getattr(warning, "context_mark", None)
    node = getattr(warning, "node", None)
    if mark is None and node is not None:
        mark = getattr(node, "start_mark", None)
    text = str(warning)
    line: int | None = None
    col: int | None = None
    if mark is not None:
        line, col = mark.line + 1, mark.column + 1
    elif found := _MARK.search(text):
        line, col = int(found[1]), int(found[2])
    first = next((ln for ln in text.splitlines() if ln.strip()), type(warning).__name__)
    return SpecIssue(path, line, col, "yaml", _one_line(first))


def _after_long_key(text: str, index: int) -> bool:
    """True when ``index`` (a ':' YAML refused) follows a key over YAML's 1024 characters."""
    start = max(text.rfind(c, 0, index) for c in "\n{,[")
    return text[index : index + 1] == ":" and index - start > 1025


def _pos(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _line_col(text: str, index: int) -> tuple[int, int]:
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def _join_surrogates(text: str) -> str:
    """``"\\ud83d\\ude00"`` (JSON's escape for one emoji) is one character, as in JSON."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_tag(tag: Any) -> str:
    text = str(tag or "?")
    return "!!" + text[len(_CORE) :] if text.startswith(_CORE) else text


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def _human(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")
