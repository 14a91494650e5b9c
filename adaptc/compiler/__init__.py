"""The compiler: a spec and a model in, a new model with LoRA branches in fx graphs out."""

from adaptc.compiler.adapters import add_adapter, delete_adapter
from adaptc.compiler.compile import AdaptcWarning, Compiled, CompileError, compile, merge
from adaptc.compiler.passes import MergeError
from adaptc.compiler.switch import active_adapters, disabled, set_active

__all__ = [
    "AdaptcWarning",
    "CompileError",
    "Compiled",
    "MergeError",
    "active_adapters",
    "add_adapter",
    "compile",
    "delete_adapter",
    "disabled",
    "merge",
    "set_active",
]
