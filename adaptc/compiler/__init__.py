"""The compiler: a spec and a model in, a new model with LoRA branches in fx graphs out."""

from adaptc.compiler.adapters import add_adapter, delete_adapter
from adaptc.compiler.combine import COMBINATION_TYPES, combine_adapters
from adaptc.compiler.compile import AdaptcWarning, Compiled, CompileError, compile, merge
from adaptc.compiler.mixed import MixedBatchError, adapter_ids, adapter_names, mixed_batch
from adaptc.compiler.passes import MergeError
from adaptc.compiler.switch import active_adapters, disabled, set_active

__all__ = [
    "COMBINATION_TYPES",
    "AdaptcWarning",
    "CompileError",
    "Compiled",
    "MergeError",
    "MixedBatchError",
    "active_adapters",
    "adapter_ids",
    "adapter_names",
    "add_adapter",
    "combine_adapters",
    "compile",
    "delete_adapter",
    "disabled",
    "merge",
    "mixed_batch",
    "set_active",
]
