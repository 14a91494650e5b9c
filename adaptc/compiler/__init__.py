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
from adaptc.compiler.errors import NoTargetsError
from adaptc.compiler.inplace import merge_in_place, merged_adapters, unmerge_in_place, unmerged
from adaptc.compiler.passes import MergeError

__all__ = [
    "AdaptcWarning",
    "CompileError",
    "Compiled",
    "MergeError",
    "NoTargetsError",
    "compile",
    "compiled",
    "compiled_info",
    "merge",
    "merge_in_place",
    "merged_adapters",
    "rebuild",
    "unmerge_in_place",
    "unmerged",
]
