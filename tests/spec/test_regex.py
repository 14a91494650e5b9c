"""Regex checks: valid patterns pass, broken and catastrophic ones are named."""

from __future__ import annotations

import pytest

from adaptc.spec.regex import MAX_PATTERN_LENGTH, check_pattern

SAFE = [
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",  # PEFT's docs
    r"(.*\.)?q_proj$",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"(a|b)*",
    r"a{2,}",
    r"(a{1,3}){1,5}",
    r"(ab)?c+",
    r"layers",
]
CATASTROPHIC = [r"(a+)+", r"(a*)*", r"(\w+\.?)+$", r"(?:x+y?)*z", r"((ab)*c)+", r"(a|b+)*"]


@pytest.mark.parametrize("pattern", SAFE)
def test_safe_patterns_pass(pattern):
    assert check_pattern(pattern) is None


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_nested_quantifiers_are_refused(pattern):
    problem = check_pattern(pattern)
    assert problem is not None and "backtrack catastrophically" in problem


def test_invalid_regex_names_the_position():
    assert (
        check_pattern("ab(c")
        == "invalid regex 'ab(c': missing ), unterminated subpattern at position 2"
    )


def test_overlong_pattern():
    problem = check_pattern("a" * (MAX_PATTERN_LENGTH + 1))
    assert (
        problem
        == f"regex is {MAX_PATTERN_LENGTH + 1} characters long; the limit is {MAX_PATTERN_LENGTH}"
    )
