"""LoRA variants (DoRA, …): objects registered per layer kind, looked up, never flags.

A variant changes how a LoRA branch is built, emitted and merged on some layer kinds
(PEFT's ``LoraVariant`` table). A branch built by a variant records the variant's name
in ``branch.variant``; the rules ask :func:`variant_of` and call the variant's hooks, so
no rule imports a variant, and a new variant is one module that calls :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from adaptc.layers import LayerKind

if TYPE_CHECKING:  # the rules import this module; a variant's hooks receive a rule
    from adaptc.methods.lora.branch import LoraBranch
    from adaptc.methods.lora.rule import BranchConfig, LoraRule, Merged

__all__ = ["Variant", "register", "variant_for", "variant_names", "variant_of", "variant_title"]


class Variant(ABC):
    """The hooks of one variant on the layer kinds it is registered for."""

    title: str  # its name in messages, e.g. "DoRA"

    @abstractmethod
    def make_branch(
        self, rule: LoraRule, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        """The variant's branch (its ``variant`` attribute set) and base tensor replacements."""

    @abstractmethod
    def emit(
        self,
        rule: LoraRule,
        graph: fx.Graph,
        x: fx.Node,
        base_out: fx.Node,
        *,
        base: nn.Module,
        base_path: str,
        branch: LoraBranch,
        branch_path: str,
    ) -> fx.Node:
        """Insert the branch's nodes after ``base_out``; return the layer's new output."""

    @abstractmethod
    def merge(
        self, rule: LoraRule, module: nn.Module, branch: LoraBranch, weight: torch.Tensor
    ) -> Merged:
        """Merged tensors for ``weight`` (possibly already merged with other adapters)."""


_VARIANTS: dict[tuple[str, str], Variant] = {}  # (variant name, layer kind name) -> hooks


def register(name: str, kinds: tuple[str, ...], variant: Variant) -> Variant:
    """Make ``variant`` the implementation of ``name`` on each of the layer ``kinds``."""
    for kind in kinds:
        _VARIANTS[(name, kind)] = variant
    return variant


def variant_title(name: str) -> str:
    """The variant's name in messages (``"dora"`` → ``"DoRA"``)."""
    return next((v.title for (n, _), v in _VARIANTS.items() if n == name), name)


def variant_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for name, _ in _VARIANTS))


def variant_for(name: str, kind: LayerKind, target: str) -> Variant:
    """The hooks of variant ``name`` on ``kind``; a ValueError naming the kinds it has."""
    found = _VARIANTS.get((name, kind.name))
    if found is None:
        has = sorted(k for n, k in _VARIANTS if n == name)
        raise ValueError(
            f"{target}: the LoRA variant {name!r} is not available for {kind.name} layers "
            f"(it is for: {', '.join(has) or 'none'})"
        )
    return found


def variant_of(branch: LoraBranch, kind: LayerKind) -> Variant | None:
    """The variant that built ``branch``, or None for a plain branch."""
    name = branch.variant
    return None if name is None else variant_for(name, kind, branch.target)
