"""The compiler: a spec and a model in, a new model with the adapters' branches in fx graphs."""

from adaptc.compiler.compile import (
    AdaptcWarning,
    Compiled,
    CompileError,
    compile,
    compiled,
    compiled_info,
    merge,
    rebuild,
)
from adaptc.compiler.passes import MergeError

__all__ = [
    "AdaptcWarning",
    "CompileError",
    "Compiled",
    "MergeError",
    "compile",
    "compiled",
    "compiled_info",
    "merge",
    "rebuild",
]
