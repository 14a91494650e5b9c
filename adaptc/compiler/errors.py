"""The compiler's error and warning types."""

from __future__ import annotations

__all__ = ["AdaptcWarning", "CompileError", "NoTargetsError"]


class CompileError(ValueError):
    """The spec cannot be compiled onto this model (one line, says what and where)."""


class NoTargetsError(CompileError):
    """An adapter's targets select no layer of the model (the message says which and
    what the model has)."""


class AdaptcWarning(UserWarning):
    """Something worth knowing that does not stop compilation."""
