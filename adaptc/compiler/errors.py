"""The compiler's error and warning types."""

from __future__ import annotations

__all__ = ["AdaptcWarning", "CompileError"]


class CompileError(ValueError):
    """The spec cannot be compiled onto this model (one line, says what and where)."""


class AdaptcWarning(UserWarning):
    """Something worth knowing that does not stop compilation."""
