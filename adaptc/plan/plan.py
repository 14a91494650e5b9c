"""The Plan: what compiling a spec onto a model will do, computed before any weight moves.

A plan is a plain, frozen, serialisable value: one :class:`PlannedTarget` per (adapter,
module) with its layer type, shapes, rank, alpha, scaling and added parameters, plus the
modules to save and the biases that will train. It works on the meta device.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from adaptc.layers import BranchConfig, LayerRule, rule_for, supported_names
from adaptc.plan.match import resolve_targets
from adaptc.spec import LoraAdapter, Spec, load_spec

__all__ = ["Plan", "PlannedTarget", "build_plan", "pattern_value"]


@dataclass(frozen=True)
class PlannedTarget:
    """One adapter on one module."""

    adapter: str
    path: str
    layer_type: str
    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    scaling: float
    params: int
    use_dora: bool = False
    fan_in_fan_out: bool = False

    def branch_config(self, adapter: LoraAdapter) -> BranchConfig:
        return BranchConfig(
            adapter=self.adapter,
            target=self.path,
            r=self.r,
            lora_alpha=self.lora_alpha,
            scaling=self.scaling,
            lora_dropout=adapter.lora_dropout,
            use_dora=adapter.use_dora,
            init=adapter.init,
            pissa_niter=adapter.pissa_niter,
            lora_bias=adapter.lora_bias,
            fan_in_fan_out=self.fan_in_fan_out,
        )


@dataclass(frozen=True)
class Plan:
    """Everything ``compile`` will do; printable (``str``) and serialisable (``to_dict``)."""

    targets: tuple[PlannedTarget, ...]
    modules_to_save: tuple[tuple[str, str, int], ...] = ()  # (adapter, path, params)
    trainable_biases: tuple[tuple[str, int], ...] = ()  # (parameter name, numel)
    base_params: int = 0
    warnings: tuple[str, ...] = field(default=())

    @property
    def adapter_params(self) -> int:
        return sum(t.params for t in self.targets)

    @property
    def trainable_params(self) -> int:
        saved = sum(n for _, _, n in self.modules_to_save)
        return self.adapter_params + saved + sum(n for _, n in self.trainable_biases)

    @property
    def total_params(self) -> int:
        """Parameters of the compiled model (saved modules keep their original, as in PEFT)."""
        return self.base_params + self.adapter_params + sum(n for _, _, n in self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": [asdict(t) for t in self.targets],
            "modules_to_save": [
                {"adapter": a, "path": p, "params": n} for a, p, n in self.modules_to_save
            ],
            "trainable_biases": [{"name": p, "params": n} for p, n in self.trainable_biases],
            "base_params": self.base_params,
            "adapter_params": self.adapter_params,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        header = ("adapter", "module", "type", "in", "out", "r", "alpha", "scaling", "params")
        rows = [
            (
                t.adapter,
                t.path,
                t.layer_type,
                str(t.in_features),
                str(t.out_features),
                str(t.r),
                f"{t.lora_alpha:g}",
                f"{t.scaling:g}",
                f"{t.params:,}",
            )
            for t in self.targets
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for adapter, path, n in self.modules_to_save:
            lines.append(f"modules_to_save[{adapter}]: {path} ({n:,} params, trainable copy)")
        if self.trainable_biases:
            lines.append(
                f"trainable biases: {len(self.trainable_biases)} "
                f"({sum(n for _, n in self.trainable_biases):,} params)"
            )
        lines.append(
            f"{len(self.targets)} adapted modules, {self.adapter_params:,} adapter "
            f"params; trainable {self.trainable_params:,} of {self.total_params:,}"
        )
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key with ``(.*\\.)?(KEY)$`` matching ``path``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def build_plan(model: nn.Module, spec: Spec | Any) -> Plan:
    """Resolve ``spec`` against ``model``. Raises a one-line ``ValueError`` on any problem."""
    spec = load_spec(spec)
    modules = dict(model.named_modules())
    targets: list[PlannedTarget] = []
    saved: list[tuple[str, str, int]] = []
    warnings: list[str] = []
    bias_paths: set[str] = set()
    for name, adapter in spec.adapters.items():
        match = resolve_targets(
            model,
            adapter,
            supported=lambda m: rule_for(m) is not None,
            supported_names=supported_names(),
            task_type=spec.task_type,
        )
        warnings.extend(match.warnings)
        for path in match.targets:
            module = modules[path]
            rule = rule_for(module)
            assert rule is not None
            planned = _plan_target(rule, module, path, name, adapter)
            warnings.extend(rule.check(module, planned.branch_config(adapter)))
            targets.append(planned)
            if adapter.bias == "lora_only" and getattr(module, "bias", None) is not None:
                bias_paths.add(f"{path}.bias")
        for path in match.modules_to_save:  # get_submodule: a saved module may have two names
            numel = sum(p.numel() for p in model.get_submodule(path).parameters())
            saved.append((name, path, numel))
        if adapter.bias == "all":
            bias_paths.update(n for n, _ in model.named_parameters() if "bias" in n)
    named = dict(model.named_parameters())
    biases = tuple((p, named[p].numel()) for p in sorted(bias_paths) if p in named)
    base = sum(p.numel() for p in model.parameters())
    return Plan(tuple(targets), tuple(saved), biases, base, tuple(dict.fromkeys(warnings)))


def _plan_target(
    rule: LayerRule, module: nn.Module, path: str, name: str, adapter: LoraAdapter
) -> PlannedTarget:
    r = int(pattern_value(dict(adapter.rank_pattern), path, adapter.r))
    alpha = pattern_value(dict(adapter.alpha_pattern), path, adapter.lora_alpha)
    scaling = alpha / math.sqrt(r) if adapter.use_rslora else alpha / r
    fan_in, fan_out = rule.features(module)
    planned = PlannedTarget(
        adapter=name,
        path=path,
        layer_type=rule.name,
        in_features=fan_in,
        out_features=fan_out,
        r=r,
        lora_alpha=alpha,
        scaling=scaling,
        params=0,
        use_dora=adapter.use_dora,
        fan_in_fan_out=rule.fan_in_fan_out(module, adapter.fan_in_fan_out),
    )
    cfg = planned.branch_config(adapter)
    shapes = tuple((k, tuple(p.shape)) for k, p in module.named_parameters(recurse=False))
    key = (rule.name, type(module), shapes, replace(cfg, target="", adapter=""))
    if key not in _PARAM_COUNTS:  # layers of one shape have one count: build one meta branch
        branch, _ = rule.make_branch(_meta_twin(module), cfg)
        _PARAM_COUNTS[key] = sum(p.numel() for p in branch.parameters())
    return replace(planned, params=_PARAM_COUNTS[key])


_PARAM_COUNTS: dict[tuple[Any, ...], int] = {}


def _meta_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of a leaf whose tensors live on the meta device (for counting)."""
    twin = copy.copy(module)
    twin._parameters = {
        k: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for k, p in module._parameters.items()
    }
    twin._buffers = {
        k: None if b is None else torch.empty_like(b, device="meta")
        for k, b in module._buffers.items()
    }
    twin._modules = {}
    return twin
