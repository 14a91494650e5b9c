"""LoRA as an adapter method: its rules per layer kind, plan settings, emit and merge."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from adaptc.layers import LayerKind, find_kind, kinds
from adaptc.methods.base import Branch, Companions, Method, Settings
from adaptc.methods.lora import alora, dora  # their variants register on import
from adaptc.methods.lora.bnb import BnbRule
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.conv import ConvRule
from adaptc.methods.lora.embedding import EmbeddingRule
from adaptc.methods.lora.linear import LinearRule
from adaptc.methods.lora.mha import MultiheadAttentionRule
from adaptc.methods.lora.parameter import ParameterRule
from adaptc.methods.lora.quantized import HqqRule, QuantizedRule, TorchaoRule
from adaptc.methods.lora.rule import BranchConfig, LoraRule
from adaptc.methods.lora.spec import LoftqSettings, LoraAdapter
from adaptc.methods.lora.targets import LORA_TARGET_MODULES
from adaptc.methods.lora.tying import lora_companions, tie_lora, with_tied_targets

__all__ = ["METHOD", "LoraMethod", "pattern_value", "rule_for"]

# LoRA's rule for each layer kind it supports (PEFT's lora.Linear, lora.Conv2d, …)
_RULE_TYPES: dict[str, type[LoraRule]] = {
    "bnb.Linear8bitLt": BnbRule,
    "bnb.Linear4bit": BnbRule,
    "quanto.QLinear": QuantizedRule,
    "torchao.Linear": TorchaoRule,
    "hqq.HQQLinear": HqqRule,
    "nn.Linear": LinearRule,
    "transformers.Conv1D": LinearRule,
    "nn.Embedding": EmbeddingRule,
    "nn.Conv1d": ConvRule,
    "nn.Conv2d": ConvRule,
    "nn.Conv3d": ConvRule,
    "nn.MultiheadAttention": MultiheadAttentionRule,
    "nn.Parameter": ParameterRule,  # target_parameters (a mixture of experts' stacks)
}


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key with ``(.*\\.)?(KEY)$`` matching ``path``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class LoraMethod(Method):
    """``x ↦ W₀x + s·B·A·x`` (see :mod:`adaptc.methods.lora.branch`)."""

    name = "lora"
    title = "LoRA"
    prefix = "lora_"
    branch_type = LoraBranch
    default_targets = LORA_TARGET_MODULES

    def __init__(self) -> None:
        self.rules: dict[str, LoraRule] = {}
        for kind in kinds():
            rule_type = _RULE_TYPES.get(kind.name)
            if rule_type is not None:
                self.rules[kind.name] = rule_type(kind)
        # the module kinds it supports (a targeted parameter is not selected by targets)
        module_kinds = [k for k in self.rules if self.rules[k].kind.module]
        self.kinds = tuple(module_kinds)  # type: ignore[misc]

    def rule(self, kind: LayerKind) -> LoraRule:
        return self.rules[kind.name]

    # ensure_weight_tying and trainable_token_indices (adaptc.methods.lora.tying)
    def with_model(self, spec: Any, model: nn.Module) -> Any:
        assert isinstance(spec, LoraAdapter)
        return with_tied_targets(spec, model)

    def companions(
        self, model: nn.Module, spec: Any, adapter: str, targets: tuple[str, ...]
    ) -> Companions:
        assert isinstance(spec, LoraAdapter)
        return lora_companions(self, model, spec, adapter, targets)

    def tie(self, branch: Branch, source: Branch, settings: Settings) -> None:
        tie_lora(branch, source, settings)

    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> BranchConfig:
        assert isinstance(spec, LoraAdapter)
        r = int(pattern_value(dict(spec.rank_pattern), path, spec.r))
        alpha = pattern_value(dict(spec.alpha_pattern), path, spec.lora_alpha)
        return BranchConfig(
            adapter=adapter,
            target=path,
            r=r,
            lora_alpha=alpha,
            scaling=alpha / math.sqrt(r) if spec.use_rslora else alpha / r,
            lora_dropout=spec.lora_dropout,
            variant=_variant(spec),
            init=spec.init,
            pissa_niter=spec.pissa_niter,
            loftq=_loftq(spec),
            lora_bias=spec.lora_bias,
            fan_in_fan_out=kind.transposed(module, spec.fan_in_fan_out),
            bias=spec.bias,
        )

    def check(self, kind: LayerKind, module: nn.Module, settings: Settings) -> list[str]:
        assert isinstance(settings, BranchConfig)
        return self.rule(kind).check(module, settings)

    def columns(self) -> tuple[str, ...]:
        return ("r", "alpha", "scaling")

    def row(self, settings: Settings) -> tuple[str, ...]:
        assert isinstance(settings, BranchConfig)
        return (str(settings.r), f"{settings.lora_alpha:g}", f"{settings.scaling:g}")

    def plan_fields(self, settings: Settings) -> dict[str, Any]:
        assert isinstance(settings, BranchConfig)
        return {
            "r": settings.r,
            "lora_alpha": settings.lora_alpha,
            "scaling": settings.scaling,
            "use_dora": settings.variant == "dora",
            "fan_in_fan_out": settings.fan_in_fan_out,
        }

    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[Branch, dict[str, torch.Tensor]]:
        assert isinstance(settings, BranchConfig)
        if settings.tied_to is not None:  # PEFT initialises a tied head once tied (tie)
            settings = replace(settings, init="random")
        return self.rule(kind).make_branch(module, settings)

    def emit(
        self,
        graph: fx.Graph,
        call: fx.Node,
        x: fx.Node,
        current: fx.Node,
        *,
        kind: LayerKind,
        base: nn.Module,
        branch: Branch,
        branch_path: str,
    ) -> fx.Node:
        assert isinstance(branch, LoraBranch)
        return self.rule(kind).emit(
            graph, x, current, base=base, base_path=str(call.target), branch=branch,
            branch_path=branch_path,
        )  # fmt: skip

    def merge(
        self,
        kind: LayerKind,
        module: nn.Module,
        branch: Branch,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert isinstance(branch, LoraBranch)
        result = self.rule(kind).merge(module, branch, weight)
        if result.bias is not None:  # rules add to the layer's own bias: accumulate the deltas
            own = module.bias
            assert bias is not None and isinstance(own, torch.Tensor)
            bias = bias + (result.bias - own)
        return result.weight, bias


METHOD = LoraMethod()


def rule_for(module: nn.Module) -> LoraRule | None:
    """LoRA's rule for ``module``'s layer kind, or None."""
    kind = find_kind(module)
    return None if kind is None else METHOD.rules.get(kind.name)


def _loftq(spec: LoraAdapter) -> tuple[int, int] | None:
    """``(bits, iterations)`` for ``init: loftq`` (PEFT's ``LoftQConfig`` defaults when omitted)."""
    if spec.init != "loftq":
        return None
    settings = spec.loftq or LoftqSettings()
    return settings.bits, settings.iterations


def _variant(spec: LoraAdapter) -> str | None:
    """The registered variant the adapter's settings ask for (None: plain LoRA)."""
    if spec.use_dora:
        return dora.NAME
    if spec.alora_invocation_tokens is not None:
        return alora.NAME
    return None
