"""LoRA's rules: how one layer kind gets a LoRA branch, and how it merges.

A rule is pure: it reads the base layer (through its :class:`~adaptc.layers.LayerKind`)
and a :class:`BranchConfig`, builds a new :class:`~adaptc.methods.lora.branch.LoraBranch`,
emits the branch's nodes into an fx graph, and computes merged weights. It never mutates
the base layer (that module is shared with the user's original model). A branch of a
variant (DoRA) is built, emitted and merged by the variant registered for the rule's
kind (:mod:`adaptc.methods.lora.variants`); rules never name a variant.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from adaptc.layers import LayerKind
from adaptc.methods.base import Settings
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.emit import emit_linear_branch
from adaptc.methods.lora.init import init_problem, init_warning
from adaptc.methods.lora.variants import variant_for, variant_of

__all__ = ["BranchConfig", "LoraRule", "Merged", "adapter_dtype", "round_as_peft"]


@dataclass(frozen=True)
class BranchConfig(Settings):
    """Everything a rule needs to build one adapter's branch on one target: LoRA's
    per-target settings in the plan."""

    adapter: str
    target: str  # the module's path in the user's model, e.g. "model.layers.0.self_attn.q_proj"
    r: int
    lora_alpha: float
    scaling: float
    lora_dropout: float = 0.0
    variant: str | None = None  # a registered variant's name, e.g. "dora"
    init: str = "default"
    pissa_niter: int | None = None
    loftq: tuple[int, int] | None = None  # with init "loftq": (bits, iterations)
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"  # the adapter's bias mode: none, all, lora_only
    tied_to: str | None = None  # ensure_weight_tying: the input embedding it shares factors with


@dataclass(frozen=True)
class Merged:
    """New base tensors after merging; None where the base tensor is unchanged."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


class LoraRule(ABC):
    """LoRA on one layer kind."""

    # how a mixed batch computes this kind's per-sample terms: "linear", "conv" or
    # "embedding" (the kernels of adaptc.adapters.mixed)
    batch_form: ClassVar[str]

    def __init__(self, kind: LayerKind) -> None:
        self.kind = kind

    @property
    def name(self) -> str:
        return self.kind.name

    def features(self, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) as PEFT defines them for this layer."""
        return self.kind.features(module)

    def fan_in_fan_out(self, module: nn.Module, requested: bool) -> bool:
        """Whether the weight is stored (in, out) (the kind decides where it is fixed)."""
        return self.kind.transposed(module, requested)

    def make_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        """A new, initialised branch, and replacements for base tensors (PiSSA/OLoRA only)."""
        self.refuse(module, cfg)
        if cfg.variant is not None:
            return variant_for(cfg.variant, self.kind, cfg.target).make_branch(self, module, cfg)
        return self.make_plain_branch(module, cfg)

    def refuse(self, module: nn.Module, cfg: BranchConfig) -> None:
        """Raise ValueError for what PEFT refuses, or would compute inconsistently (here:
        an init the layer's rank or dtype does not allow; rules refuse more)."""
        self.refuse_init(module, cfg)

    def refuse_init(self, module: nn.Module, cfg: BranchConfig) -> None:
        """Raise ValueError when PEFT cannot give the layer the init ``cfg.init``."""
        fan_in, fan_out = self.features(module)
        dtype = self.kind.weight(module).dtype if cfg.init == "mica" else torch.float32
        problem = init_problem(cfg.init, cfg.r, fan_in, fan_out, dtype)
        if problem is not None:
            raise ValueError(f"{cfg.target}: {problem}")

    def check(self, module: nn.Module, cfg: BranchConfig) -> list[str]:
        """Raise ValueError when the branch cannot be built; return warnings otherwise."""
        self.refuse_init(module, cfg)
        fan_in, fan_out = self.features(module)
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
        about_init = init_warning(cfg.init, cfg.scaling)
        if about_init is not None:
            warnings.append(f"{cfg.target}: {about_init}")
        return warnings

    @abstractmethod
    def make_plain_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        """A new, initialised branch without a variant, and base tensor replacements."""

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
        A variant's branch is emitted by its variant; a plain one by :meth:`emit_plain`.
        """
        variant = variant_of(branch, self.kind)
        if variant is not None:
            return variant.emit(
                self, graph, x, base_out, base=base, base_path=base_path, branch=branch,
                branch_path=branch_path,
            )  # fmt: skip
        return self.emit_plain(
            graph, x, base_out, base=base, base_path=base_path, branch=branch,
            branch_path=branch_path,
        )  # fmt: skip

    def emit_plain(
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
        """``base_out + lora_B(lora_A(dropout(x))) * s`` (rules whose branch differs override)."""
        return emit_linear_branch(
            graph, x, base_out, out_dtype=self.out_dtype(base), branch=branch,
            branch_path=branch_path,
        )  # fmt: skip

    def out_dtype(self, base: nn.Module) -> torch.dtype | None:
        """The dtype the layer's output is cast back to after the adapter's: its kind's
        compute dtype; None where the result's dtype follows the input at run time (the
        LoRA output is then cast to it before the add: :func:`emit_linear_branch`)."""
        return self.kind.compute_dtype(base)

    @abstractmethod
    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        """``s·ΔW`` in the layout of the base weight."""

    def merge(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        """Merged tensors for ``weight`` (the base weight, possibly already merged with others)."""
        variant = variant_of(branch, self.kind)
        if variant is not None:
            return variant.merge(self, module, branch, weight)
        return self.merge_plain(module, branch, weight)

    def merge_plain(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        """``weight + s·ΔW`` (and the bias plus ``lora_B``'s bias with ``lora_bias``)."""
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


@torch.no_grad()
def round_as_peft(base_dtype: torch.dtype, *factors: torch.Tensor | None) -> None:
    """Round freshly initialised factors to a half-precision base's dtype, in place.

    PEFT initialises adapter weights in float32, moves them to the base layer's dtype and
    then (``autocast_adapter_dtype``) back to float32, so on a float16/bfloat16 base their
    values are that dtype's: rounding the same draws gives PEFT's factors for a seed."""
    if base_dtype not in (torch.float16, torch.bfloat16):
        return
    for t in factors:
        if t is not None and t.dtype != base_dtype and t.device.type != "meta":
            t.copy_(t.to(base_dtype))


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter weights are float32 on a half-precision base (PEFT's autocast_adapter_dtype)."""
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype
