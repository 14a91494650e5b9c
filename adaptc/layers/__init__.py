"""Layer rules: the registry of layer types that can carry a LoRA branch."""

from adaptc.layers.base import (
    BranchConfig,
    LayerRule,
    Merged,
    UnsupportedLayerError,
    register,
    rule_for,
    rules,
    supported_names,
)
from adaptc.layers.branch import LoraBranch
from adaptc.layers.linear import Conv1DRule, LinearRule

# First match wins: specific rules before general ones.
register(Conv1DRule())
register(LinearRule())

__all__ = [
    "BranchConfig",
    "LayerRule",
    "LoraBranch",
    "Merged",
    "UnsupportedLayerError",
    "register",
    "rule_for",
    "rules",
    "supported_names",
]
