"""Layer rules: how one kind of layer gets a LoRA branch, and how it merges.

A rule is pure: it reads the base layer and a :class:`BranchConfig`, builds a new
:class:`~adaptc.layers.branch.LoraBranch`, emits the branch's nodes into an fx graph, and
computes merged weights. It never mutates the base layer (that module is shared with the
user's original model). Rules live in a registry; the first rule that matches wins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import fx, nn

from adaptc.layers.branch import LoraBranch

__all__ = [
    "BranchConfig",
    "LayerRule",
    "Merged",
    "UnsupportedLayerError",
    "adapter_dtype",
    "register",
    "rule_for",
    "rules",
    "supported_names",
]


@dataclass(frozen=True)
class BranchConfig:
    """Everything a rule needs to build one adapter's branch on one target."""

    adapter: str
    target: str  # the module's path in the user's model, e.g. "model.layers.0.self_attn.q_proj"
    r: int
    lora_alpha: float
    scaling: float
    lora_dropout: float = 0.0
    use_dora: bool = False
    init: str = "default"
    pissa_niter: int | None = None
    lora_bias: bool = False
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class Merged:
    """New base tensors after merging; None where the base tensor is unchanged."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


class UnsupportedLayerError(ValueError):
    """A target's layer type has no rule."""


class LayerRule(ABC):
    """One kind of layer. Subclasses set ``name`` (the spec's type name) and ``layer_type``."""

    name: str
    layer_type: type[nn.Module]

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_type)

    @abstractmethod
    def features(self, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) as PEFT defines them for this layer."""

    def fan_in_fan_out(self, module: nn.Module, requested: bool) -> bool:
        """Whether the weight is stored (in, out); rules for such layers force True."""
        return requested

    def check(self, module: nn.Module, cfg: BranchConfig) -> list[str]:
        """Raise ValueError when the branch cannot be built; return warnings otherwise."""
        fan_in, fan_out = self.features(module)
        if cfg.init in ("pissa", "olora") and cfg.r > min(fan_in, fan_out):
            raise ValueError(
                f"{cfg.target}: r={cfg.r} is larger than the layer allows for init "
                f"{cfg.init!r} (min(in, out) = {min(fan_in, fan_out)})"
            )
        warnings = []
        if cfg.r > min(fan_in, fan_out):
            warnings.append(
                f"{cfg.target}: r={cfg.r} exceeds min(in_features, out_features) = "
                f"{min(fan_in, fan_out)}; the update cannot use the extra rank"
            )
        if cfg.lora_bias and getattr(module, "bias", None) is None:
            warnings.append(
                f"{cfg.target}: lora_bias on a layer that has no bias: merging will not be possible"
            )
        return warnings

    @abstractmethod
    def make_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        """A new, initialised branch, and replacements for base tensors (PiSSA/OLoRA only)."""

    def emit(
        self,
        graph: fx.Graph,
        x: fx.Node,
        base_out: fx.Node,
        *,
        base: nn.Module,
        base_path: str,
        branch: LoraBranch,
        branch_path: str,
    ) -> fx.Node:
        """Insert the branch's nodes after ``base_out``; return the node holding the sum.

        ``base_path`` and ``branch_path`` are the qualified names of the base layer and of
        the branch in the module that owns ``graph``. The caller rewires ``base_out``'s users.
        The default emits ``base_out + lora_B(lora_A(dropout(x))) * s`` (a DoRA branch
        emits its own call); rules whose branch differs override it.
        """
        if getattr(branch, "is_dora", False):
            from adaptc.layers.dora import emit_dora_branch

            return emit_dora_branch(
                self, graph, x, base_out, base=base, base_path=base_path, branch=branch,
                branch_path=branch_path,
            )  # fmt: skip
        from adaptc.layers.linear import emit_linear_branch

        return emit_linear_branch(
            graph, x, base_out, base=base, branch=branch, branch_path=branch_path
        )

    @abstractmethod
    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        """``s·ΔW`` in the layout of the base weight."""

    def merge(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        """Merged tensors for ``weight`` (the base weight, possibly already merged with others)."""
        new_weight = weight + self.delta_weight(module, branch).to(weight.dtype)
        new_bias = None
        if branch.lora_bias:
            bias = getattr(module, "bias", None)
            if bias is None:
                raise ValueError(f"{branch.target}: cannot merge lora_bias, the layer has no bias")
            lora_b_bias = branch.lora_B.bias
            assert isinstance(lora_b_bias, torch.Tensor)
            new_bias = bias + (lora_b_bias * branch.scaling).to(bias.dtype)
        return Merged(new_weight, new_bias)


_RULES: list[LayerRule] = []


def register(rule: LayerRule) -> LayerRule:
    """Add a rule; more specific rules must be registered before general ones."""
    _RULES.append(rule)
    return rule


def rules() -> tuple[LayerRule, ...]:
    return tuple(_RULES)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The first rule that matches ``module``."""
    for rule in _RULES:
        if rule.matches(module):
            return rule
    return None


def supported_names() -> tuple[str, ...]:
    return tuple(rule.name for rule in _RULES)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter weights are float32 on a half-precision base (PEFT's autocast_adapter_dtype)."""
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype
