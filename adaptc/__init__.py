"""adaptc: a declarative adapter-spec compiler for PyTorch models."""

from adaptc import layers
from adaptc.compiler import (
    AdaptcWarning,
    CompileError,
    MergeError,
    active_adapters,
    compile,
    disabled,
    merge,
    set_active,
)
from adaptc.counting import print_trainable_parameters, trainable_parameters
from adaptc.io import AdapterLoadError, load_adapter, save_adapter
from adaptc.plan.plan import Plan, build_plan
from adaptc.spec import Spec, SpecError, SpecIssue, load_spec

__version__ = "0.1.0"

__all__ = [
    "AdaptcWarning",
    "AdapterLoadError",
    "CompileError",
    "MergeError",
    "Plan",
    "Spec",
    "SpecError",
    "SpecIssue",
    "__version__",
    "active_adapters",
    "build_plan",
    "compile",
    "disabled",
    "layers",
    "load_adapter",
    "load_spec",
    "merge",
    "print_trainable_parameters",
    "save_adapter",
    "set_active",
    "trainable_parameters",
]
