"""Checks that a user's regular expression is valid and cannot backtrack catastrophically.

Specs are checked in CI, so a pattern is never *run* during validation: it is compiled
and its parse tree is inspected. A quantifier whose body can itself repeat without bound
(``(a+)+``, ``(.*)*``, ``(\\w+\\.?)+``) is the classic exponential-backtracking shape and is
refused with a message that says which part of the pattern to rewrite.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any

# The regex parser behind ``re``: ``re._parser`` since Python 3.11, ``sre_parse`` before.
_NEW = sys.version_info >= (3, 11)
_p: Any = importlib.import_module("re._parser" if _NEW else "sre_parse")
_c: Any = importlib.import_module("re._constants" if _NEW else "sre_constants")

__all__ = ["MAX_PATTERN_LENGTH", "check_pattern"]

MAX_PATTERN_LENGTH = 1000
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}


def check_pattern(pattern: str) -> str | None:
    """Return why ``pattern`` is unusable, or None when it is fine."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"regex is {len(pattern)} characters long; the limit is {MAX_PATTERN_LENGTH}"
    try:
        re.compile(pattern)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        return f"invalid regex {pattern!r}: {exc.msg}{where}"
    except OverflowError as exc:  # `a{99999999999}`: the parser raises this, not re.error
        return f"invalid regex {pattern!r}: {exc}"
    except RecursionError:
        return f"invalid regex {pattern!r}: nested too deeply"
    try:
        nested = _has_nested_quantifier(_p.parse(pattern))
    except RecursionError:
        return f"invalid regex {pattern!r}: nested too deeply"
    if nested:
        return (
            f"regex {pattern!r} may backtrack catastrophically: it repeats a group that itself "
            "repeats without bound; rewrite it without nested quantifiers"
        )
    return None


def _unbounded(op: Any, av: Any) -> bool:
    return op in _REPEATS and av[1] == _c.MAXREPEAT


def _can_repeat(items: Any) -> bool:
    """True when the parsed sub-pattern contains an unbounded repeat."""
    for op, av in items:
        if _unbounded(op, av):
            return True
        for sub in _children(op, av):
            if _can_repeat(sub):
                return True
    return False


def _children(op: Any, av: Any) -> list[Any]:
    if op in _REPEATS:
        return [av[2]]
    if op == _c.SUBPATTERN:
        return [av[-1]]
    if op == _c.BRANCH:
        return list(av[1])
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    if op == getattr(_c, "ATOMIC_GROUP", None):
        return [av]
    if op == _c.GROUPREF_EXISTS:
        return [b for b in av[1:] if b is not None]
    return []


def _has_nested_quantifier(items: Any) -> bool:
    """True when a repeat (max > 1) has a body that can repeat without bound."""
    for op, av in items:
        if op in _REPEATS and av[1] > 1 and _can_repeat(av[2]):
            return True
        if any(_has_nested_quantifier(sub) for sub in _children(op, av)):
            return True
    return False
