"""``nn.MultiheadAttention``: a layer with two weights, the fused ``in_proj_weight`` and the
``out_proj`` linear layer inside it.

PEFT's features are those of the fused input projection: ``(embed_dim, 3·embed_dim)``.
Only the shape PEFT supports is adapted: query, key and value of one size
(``_qkv_same_embed_dim``), so ``in_proj_weight`` is (3·E, E) and ``out_proj.weight`` (E, E).

For a merge the kind reads both weights as one (4·E, E) tensor, ``in_proj_weight`` stacked
on ``out_proj.weight`` (rows ``:3E`` and ``3E:``), and writes them back split: a merge
rule adds its update to each part, and the interface keeps one weight per layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from adaptc.layers.base import LayerKind

__all__ = ["MultiheadAttentionKind"]


def _out_proj(module: nn.Module) -> nn.Linear:
    out_proj = module._modules.get("out_proj")
    assert isinstance(out_proj, nn.Linear), f"{type(module).__name__} has no out_proj Linear"
    return out_proj


def _in_proj_weight(module: nn.Module) -> torch.Tensor:
    weight = module._parameters.get("in_proj_weight")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{type(module).__name__} has separate query/key/value weights (kdim/vdim differ "
            "from embed_dim), which adaptc and PEFT do not adapt"
        )
    return weight


@dataclass(frozen=True)
class MultiheadAttentionKind(LayerKind):
    """``nn.MultiheadAttention`` with query, key and value of one size (see the module)."""

    name: str = "nn.MultiheadAttention"
    layer_type: type[nn.Module] = nn.MultiheadAttention

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.MultiheadAttention)
        return module.embed_dim, 3 * module.embed_dim

    def transposed(self, module: nn.Module, requested: bool) -> bool:
        return False

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return _in_proj_weight(module).dtype

    def weight(self, module: nn.Module) -> torch.Tensor:
        """``in_proj_weight`` (3E, E) on ``out_proj.weight`` (E, E): a new (4E, E) tensor."""
        return torch.cat([_in_proj_weight(module), _out_proj(module).weight])

    def with_weights(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        """A shallow copy with ``weight[:3E]`` as ``in_proj_weight`` and a copy of ``out_proj``
        holding ``weight[3E:]`` (new frozen tensors of their own); ``bias`` must be None."""
        assert bias is None, "nn.MultiheadAttention merges no bias"
        rows = _in_proj_weight(module).shape[0]
        new = copy.copy(module)  # shallow: a new __dict__, same tensors until replaced below
        new._modules = dict(module._modules)
        new._parameters = dict(module._parameters)
        new._parameters["in_proj_weight"] = nn.Parameter(weight[:rows].clone(), requires_grad=False)
        new._modules["out_proj"] = super().with_weights(
            _out_proj(module), weight[rows:].clone(), None
        )
        for hooks in ("_forward_hooks", "_forward_pre_hooks"):
            if hooks in new.__dict__:
                new.__dict__[hooks] = copy.copy(new.__dict__[hooks])
        return new
