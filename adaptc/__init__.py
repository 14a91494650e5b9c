"""adaptc: a declarative adapter-spec compiler for PyTorch models.

The spec language is imported eagerly (it is light); the compiler, which needs torch and
transformers, is imported on first use, so ``adaptc validate`` starts in a blink.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adaptc.spec import Spec, SpecError, SpecIssue, SpecWarning, load_spec

if TYPE_CHECKING:
    from adaptc import layers
    from adaptc.adapters import (
        HotswapError,
        MixedBatchError,
        activated,
        active_adapters,
        adapter_ids,
        adapter_names,
        add_adapter,
        combine_adapters,
        delete_adapter,
        disabled,
        invocation_offsets,
        mixed_batch,
        prepare_hotswap,
        set_active,
        set_enabled,
    )
    from adaptc.adapters.eva import eva_state_dict, initialize_eva
    from adaptc.adapters.loftq import loftq_errors
    from adaptc.adapters.to_lora import to_lora
    from adaptc.api import compile, initialize_loftq, load_adapter, merge
    from adaptc.compiler import (
        AdaptcWarning,
        CompileError,
        MergeError,
        merge_in_place,
        merged_adapters,
        unmerge_in_place,
    )
    from adaptc.counting import print_trainable_parameters, trainable_parameters
    from adaptc.io import AdapterLoadError, hotswap, load_adapter_into, push_adapter, save_adapter
    from adaptc.plan.plan import Plan, build_plan

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "layers": "adaptc.layers",
    "AdaptcWarning": "adaptc.compiler",
    "CompileError": "adaptc.compiler",
    "MergeError": "adaptc.compiler",
    "merge_in_place": "adaptc.compiler",
    "merged_adapters": "adaptc.compiler",
    "unmerge_in_place": "adaptc.compiler",
    "compile": "adaptc.api",
    "merge": "adaptc.api",
    "load_adapter": "adaptc.api",
    "initialize_loftq": "adaptc.api",
    "initialize_eva": "adaptc.adapters.eva",
    "eva_state_dict": "adaptc.adapters.eva",
    "loftq_errors": "adaptc.adapters.loftq",
    "HotswapError": "adaptc.adapters",
    "prepare_hotswap": "adaptc.adapters",
    "MixedBatchError": "adaptc.adapters",
    "adapter_ids": "adaptc.adapters",
    "adapter_names": "adaptc.adapters",
    "mixed_batch": "adaptc.adapters",
    "active_adapters": "adaptc.adapters",
    "activated": "adaptc.adapters",
    "invocation_offsets": "adaptc.adapters",
    "add_adapter": "adaptc.adapters",
    "delete_adapter": "adaptc.adapters",
    "combine_adapters": "adaptc.adapters",
    "to_lora": "adaptc.adapters.to_lora",
    "disabled": "adaptc.adapters",
    "set_active": "adaptc.adapters",
    "set_enabled": "adaptc.adapters",
    "print_trainable_parameters": "adaptc.counting",
    "trainable_parameters": "adaptc.counting",
    "AdapterLoadError": "adaptc.io",
    "hotswap": "adaptc.io",
    "load_adapter_into": "adaptc.io",
    "push_adapter": "adaptc.io",
    "save_adapter": "adaptc.io",
    "Plan": "adaptc.plan.plan",
    "build_plan": "adaptc.plan.plan",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'adaptc' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"adaptc.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AdaptcWarning",
    "AdapterLoadError",
    "CompileError",
    "HotswapError",
    "MergeError",
    "MixedBatchError",
    "Plan",
    "Spec",
    "SpecError",
    "SpecIssue",
    "SpecWarning",
    "__version__",
    "activated",
    "active_adapters",
    "adapter_ids",
    "adapter_names",
    "add_adapter",
    "build_plan",
    "combine_adapters",
    "compile",
    "delete_adapter",
    "disabled",
    "eva_state_dict",
    "hotswap",
    "initialize_eva",
    "initialize_loftq",
    "invocation_offsets",
    "layers",
    "load_adapter",
    "load_adapter_into",
    "load_spec",
    "loftq_errors",
    "merge",
    "merge_in_place",
    "merged_adapters",
    "mixed_batch",
    "prepare_hotswap",
    "print_trainable_parameters",
    "push_adapter",
    "save_adapter",
    "set_active",
    "set_enabled",
    "to_lora",
    "trainable_parameters",
    "unmerge_in_place",
]
