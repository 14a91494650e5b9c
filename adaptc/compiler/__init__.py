"""The compiler: a spec and a model in, a new model with LoRA branches in fx graphs out."""

from adaptc.compiler.compile import AdaptcWarning, Compiled, CompileError, compile, merge
from adaptc.compiler.passes import MergeError

__all__ = ["AdaptcWarning", "CompileError", "Compiled", "MergeError", "compile", "merge"]
