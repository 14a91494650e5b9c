"""Layer rules: the registry of layer types that can carry a LoRA branch."""

from torch import nn

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
from adaptc.layers.conv import ConvRule
from adaptc.layers.embedding import EmbeddingBranch, EmbeddingRule
from adaptc.layers.linear import Conv1DRule, LinearRule

# First match wins: specific rules before general ones.
register(Conv1DRule())
register(LinearRule())
register(EmbeddingRule())
register(ConvRule(nn.Conv1d))
register(ConvRule(nn.Conv2d))
register(ConvRule(nn.Conv3d))

__all__ = [
    "BranchConfig",
    "ConvRule",
    "EmbeddingBranch",
    "EmbeddingRule",
    "LayerRule",
    "LoraBranch",
    "Merged",
    "UnsupportedLayerError",
    "register",
    "rule_for",
    "rules",
    "supported_names",
]
