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
    from adaptc.compiler import (
        AdaptcWarning,
        CompileError,
        MergeError,
        MixedBatchError,
        active_adapters,
        adapter_ids,
        adapter_names,
        add_adapter,
        combine_adapters,
        compile,
        delete_adapter,
        disabled,
        merge,
        mixed_batch,
        set_active,
    )
    from adaptc.compiler.hotswap import HotswapError, hotswap, prepare_hotswap
    from adaptc.counting import print_trainable_parameters, trainable_parameters
    from adaptc.io import AdapterLoadError, load_adapter, save_adapter
    from adaptc.plan.plan import Plan, build_plan

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "layers": "adaptc.layers",
    "AdaptcWarning": "adaptc.compiler",
    "CompileError": "adaptc.compiler",
    "HotswapError": "adaptc.compiler.hotswap",
    "hotswap": "adaptc.compiler.hotswap",
    "prepare_hotswap": "adaptc.compiler.hotswap",
    "MergeError": "adaptc.compiler",
    "MixedBatchError": "adaptc.compiler",
    "adapter_ids": "adaptc.compiler",
    "adapter_names": "adaptc.compiler",
    "mixed_batch": "adaptc.compiler",
    "active_adapters": "adaptc.compiler",
    "add_adapter": "adaptc.compiler",
    "delete_adapter": "adaptc.compiler",
    "combine_adapters": "adaptc.compiler",
    "compile": "adaptc.compiler",
    "disabled": "adaptc.compiler",
    "merge": "adaptc.compiler",
    "set_active": "adaptc.compiler",
    "print_trainable_parameters": "adaptc.counting",
    "trainable_parameters": "adaptc.counting",
    "AdapterLoadError": "adaptc.io",
    "load_adapter": "adaptc.io",
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
    "active_adapters",
    "adapter_ids",
    "adapter_names",
    "add_adapter",
    "build_plan",
    "combine_adapters",
    "compile",
    "delete_adapter",
    "disabled",
    "hotswap",
    "layers",
    "load_adapter",
    "load_spec",
    "merge",
    "mixed_batch",
    "prepare_hotswap",
    "print_trainable_parameters",
    "save_adapter",
    "set_active",
    "trainable_parameters",
]
