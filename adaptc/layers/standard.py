"""The layer kinds of plain PyTorch and transformers: linear layers, convolutions, embeddings."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptc.layers.base import LayerKind

__all__ = ["Conv1DKind", "ConvKind", "EmbeddingKind", "LinearKind"]


@dataclass(frozen=True)
class LinearKind(LayerKind):
    """``nn.Linear``: weight (out, in). PEFT resets a requested ``fan_in_fan_out``."""

    name: str = "nn.Linear"
    layer_type: type[nn.Module] = nn.Linear
    linear: bool = True

    def transposed(self, module: nn.Module, requested: bool) -> bool:
        return False


@dataclass(frozen=True)
class Conv1DKind(LayerKind):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is (in, out)."""

    name: str = "transformers.Conv1D"
    layer_type: type[nn.Module] = nn.Module  # set in __post_init__ (transformers' class)
    linear: bool = True

    def __post_init__(self) -> None:
        from transformers.pytorch_utils import Conv1D  # transformers is heavy: only here

        object.__setattr__(self, "layer_type", Conv1D)

    def features(self, module: nn.Module) -> tuple[int, int]:
        fan_in, fan_out = self.weight(module).shape
        return int(fan_in), int(fan_out)

    def transposed(self, module: nn.Module, requested: bool) -> bool:
        return True


@dataclass(frozen=True)
class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d``: weight (out, in/groups, *kernel); features are channels."""

    @property
    def dims(self) -> int:
        """1, 2 or 3: the number of spatial dimensions."""
        dims: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
        return dims[self.layer_type]

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        return module.in_channels, module.out_channels

    def transposed(self, module: nn.Module, requested: bool) -> bool:
        return False


@dataclass(frozen=True)
class EmbeddingKind(LayerKind):
    """``nn.Embedding`` (and subclasses such as scaled word embeddings): weight
    (num_embeddings, dim), which is (in, out): PEFT's in/out features."""

    name: str = "nn.Embedding"
    layer_type: type[nn.Module] = nn.Embedding

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Embedding)
        return module.num_embeddings, module.embedding_dim

    def transposed(self, module: nn.Module, requested: bool) -> bool:
        return True
