"""Layer kinds: the registry of layer types adapters can be put on (first match wins)."""

from torch import nn

from adaptc.layers.base import (
    LayerKind,
    UnsupportedLayerError,
    dequantized_weight,
    find_kind,
    kind_names,
    kind_of,
    kinds,
    register,
    share_parameter,
)
from adaptc.layers.bnb import Bnb4bitKind, Bnb8bitKind
from adaptc.layers.hqq import HqqKind
from adaptc.layers.mha import MultiheadAttentionKind
from adaptc.layers.parameter import PARAMETER_KIND, ParameterKind, ParameterSlot
from adaptc.layers.quanto import QuantoKind
from adaptc.layers.standard import Conv1DKind, ConvKind, EmbeddingKind, LinearKind
from adaptc.layers.torchao import TorchaoKind

# First match wins: specific kinds before general ones.
register(Bnb8bitKind())  # before nn.Linear, its base class
register(Bnb4bitKind())
register(QuantoKind())  # before nn.Linear, its base class
register(TorchaoKind())  # an nn.Linear with a torchao weight
register(HqqKind())
register(Conv1DKind())
register(LinearKind())
register(EmbeddingKind())
register(ConvKind("nn.Conv1d", nn.Conv1d))
register(ConvKind("nn.Conv2d", nn.Conv2d))
register(ConvKind("nn.Conv3d", nn.Conv3d))
register(MultiheadAttentionKind())
register(ParameterKind())  # a targeted nn.Parameter (target_parameters), never a module

__all__ = [
    "PARAMETER_KIND",
    "Bnb4bitKind",
    "Bnb8bitKind",
    "Conv1DKind",
    "ConvKind",
    "EmbeddingKind",
    "HqqKind",
    "LayerKind",
    "LinearKind",
    "MultiheadAttentionKind",
    "ParameterKind",
    "ParameterSlot",
    "QuantoKind",
    "TorchaoKind",
    "UnsupportedLayerError",
    "dequantized_weight",
    "find_kind",
    "kind_names",
    "kind_of",
    "kinds",
    "register",
    "share_parameter",
]
