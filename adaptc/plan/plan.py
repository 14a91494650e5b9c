"""The Plan: what compiling a spec onto a model will do, computed before any weight moves.

A plan is a plain, frozen, serialisable value: one :class:`PlannedTarget` per (adapter,
module) with its layer type, shapes, rank, alpha, scaling and added parameters, plus the
modules to save and the biases that will train. It works on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from adaptc.counting import parameter_count
from adaptc.layers import LayerKind, find_kind
from adaptc.methods.base import Companions, Method, Settings
from adaptc.methods.registry import method
from adaptc.plan.match import TargetError, model_type, resolve_targets
from adaptc.plan.parameters import resolve_parameters
from adaptc.plan.replicate import replicated as replicate
from adaptc.plan.replicate import spec_replication
from adaptc.spec import Spec, load_spec

__all__ = ["Plan", "PlannedTarget", "build_plan", "plan_target"]


@dataclass(frozen=True)
class PlannedTarget:
    """One adapter on one module: its layer kind and shapes, and its method's settings."""

    adapter: str
    path: str
    layer_type: str
    in_features: int
    out_features: int
    params: int
    method: str
    settings: Settings  # the method's own, e.g. LoRA's r, lora_alpha, scaling
    frozen_params: int = 0  # of `params`, those that never train (MiCA's B)

    def __getattr__(self, name: str) -> Any:
        """The method's settings read as the target's own (``target.r`` for LoRA)."""
        if name.startswith("__") or name == "settings":
            raise AttributeError(name)
        try:
            return getattr(self.settings, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__} ({self.method}) has no attribute {name!r}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "path": self.path,
            "method": self.method,
            "layer_type": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            **method(self.method).plan_fields(self.settings),
            "params": self.params,
            "frozen_params": self.frozen_params,
        }


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
    def frozen_params(self) -> int:
        """Adapter parameters that never train (MiCA's ``B``)."""
        return sum(t.frozen_params for t in self.targets)

    @property
    def trainable_params(self) -> int:
        saved = sum(n for _, _, n in self.modules_to_save)
        adapters = self.adapter_params - self.frozen_params
        return adapters + saved + sum(n for _, n in self.trainable_biases)

    @property
    def total_params(self) -> int:
        """Parameters of the compiled model (saved modules keep their original, as in PEFT)."""
        return self.base_params + self.adapter_params + sum(n for _, _, n in self.modules_to_save)

    def with_adapters(self, other: Plan) -> Plan:
        """This plan and ``other``'s adapters (planned on the same base model) after it."""
        return Plan(
            self.targets + other.targets,
            self.modules_to_save + other.modules_to_save,
            self.trainable_biases,
            self.base_params,
            self.warnings + other.warnings,
        )

    def selected(self, adapter: str, method: str) -> tuple[PlannedTarget, ...]:
        """The targets of ``adapter`` (of ``method``) that its selectors chose: not its
        companions (layers tied to a target, LoRA's trainable tokens)."""
        return tuple(
            t
            for t in self.targets
            if t.adapter == adapter
            and t.method == method
            and getattr(t.settings, "tied_to", None) is None
        )

    def without_adapter(self, name: str) -> Plan:
        return replace(
            self,
            targets=tuple(t for t in self.targets if t.adapter != name),
            modules_to_save=tuple(s for s in self.modules_to_save if s[0] != name),
        )

    def replacing_adapter(self, name: str, targets: tuple[PlannedTarget, ...]) -> Plan:
        """This plan with adapter ``name``'s targets replaced by ``targets``, in place."""
        at = next((i for i, t in enumerate(self.targets) if t.adapter == name), len(self.targets))
        others = [t for t in self.targets if t.adapter != name]
        before = sum(1 for t in self.targets[:at] if t.adapter != name)
        return replace(self, targets=(*others[:before], *targets, *others[before:]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": [t.to_dict() for t in self.targets],
            "modules_to_save": [
                {"adapter": a, "path": p, "params": n} for a, p, n in self.modules_to_save
            ],
            "trainable_biases": [{"name": p, "params": n} for p, n in self.trainable_biases],
            "base_params": self.base_params,
            "adapter_params": self.adapter_params,
            "frozen_params": self.frozen_params,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        extra: list[str] = []  # the methods' own columns, in order of appearance
        for m in dict.fromkeys(t.method for t in self.targets):
            extra.extend(c for c in method(m).columns() if c not in extra)
        header = ("adapter", "module", "type", "in", "out", *extra, "params")
        rows = []
        for t in self.targets:
            entry = method(t.method)
            own = dict(zip(entry.columns(), entry.row(t.settings), strict=True))
            values = (t.adapter, t.path, t.layer_type, str(t.in_features), str(t.out_features))
            rows.append((*values, *(own.get(c, "") for c in extra), f"{t.params:,}"))
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


def build_plan(model: nn.Module, spec: Spec | Any, *, replicated: bool = False) -> Plan:
    """Resolve ``spec`` against ``model``. Raises a one-line ``ValueError`` on any problem.

    A spec with ``layer_replication`` is resolved on the model with its layers replicated
    (:func:`~adaptc.plan.replicate.replicated`); ``replicated=True`` says ``model`` already
    is (the compiler's structure, a compiled model)."""
    spec = load_spec(spec)
    ranges = spec_replication(spec)
    if ranges is not None and not replicated:
        model = replicate(model, ranges)
    modules = dict(model.named_modules())
    targets: list[PlannedTarget] = []
    saved: list[tuple[str, str, int]] = []
    warnings: list[str] = []
    bias_paths: set[str] = set()
    for name, adapter in spec.adapters.items():
        entry = method(adapter.method)
        adapter = entry.with_defaults(adapter, model_type(model))
        given = adapter  # (companions decide from the adapter as given, not with_model's)
        adapter = entry.with_model(adapter, model)
        match = resolve_targets(
            model,
            adapter,
            supported=lambda m, entry=entry: _supports(entry, m),  # type: ignore[misc]
            supported_names=entry.kinds or (),
            task_type=spec.task_type,
            method=entry.title,
            default_targets=entry.default_targets,
            parameters=getattr(adapter, "target_parameters", None) is not None,
        )
        warnings.extend(match.warnings)
        for path in match.targets:
            module = modules[path]
            kind = find_kind(module)
            assert kind is not None
            settings = entry.settings(kind, module, path, name, adapter)
            warnings.extend(entry.check(kind, module, settings))
            targets.append(plan_target(entry, kind, module, settings))
            if (
                getattr(adapter, "bias", "none")
                in ("lora_only", "vera_only", "oft_only", "boft_only")
                and getattr(module, "bias", None) is not None
            ):
                bias_paths.add(f"{path}.bias")
        entries = getattr(adapter, "target_parameters", None)
        if entries is not None:
            found = resolve_parameters(model, entries, match.targets)
            if not found.slots and not match.targets:
                hints = "; ".join(found.warnings)
                raise TargetError(f"target_parameters matched no parameter ({hints})")
            warnings.extend(found.warnings)
            for path, slot in found.slots:
                kind = find_kind(slot)
                assert kind is not None
                settings = entry.settings(kind, slot, path, name, adapter)
                warnings.extend(entry.check(kind, slot, settings))
                targets.append(plan_target(entry, kind, slot, settings))
        extra = entry.companions(model, given, name, match.targets)  # tied layers, tokens
        warnings.extend(extra.warnings)
        targets = _with_companions(targets, extra, name, model, warnings)
        for path in match.modules_to_save:  # get_submodule: a saved module may have two names
            numel = sum(p.numel() for p in model.get_submodule(path).parameters())
            saved.append((name, path, numel))
        if getattr(adapter, "bias", "none") == "all":
            bias_paths.update(n for n, _ in model.named_parameters() if _is_bias(n))
    named = dict(model.named_parameters())
    biases = tuple((p, named[p].numel()) for p in sorted(bias_paths) if p in named)
    base = sum(parameter_count(p) for p in model.parameters())
    return Plan(tuple(targets), tuple(saved), biases, base, tuple(dict.fromkeys(warnings)))


def _is_bias(name: str) -> bool:
    """PEFT's ``bias: all`` rule: a parameter named ``bias``, not one whose name holds the
    word (``in_proj_bias``, ``bias_k``, a custom ``scale_bias`` stay frozen)."""
    return name == "bias" or name.endswith(".bias")


def _with_companions(
    targets: list[PlannedTarget],
    extra: Companions,
    adapter: str,
    model: nn.Module,
    warnings: list[str],
) -> list[PlannedTarget]:
    """``targets`` with the adapter's companions after them (their checks' warnings into
    ``warnings``); one on a path the adapter already targets with its method replaces it."""
    if not extra.targets:
        return targets
    replaced = {(entry.name, path) for entry, path, _ in extra.targets}
    kept = [t for t in targets if t.adapter != adapter or (t.method, t.path) not in replaced]
    for entry, path, settings in extra.targets:
        module = model.get_submodule(path)
        kind = find_kind(module)
        assert kind is not None, path
        warnings.extend(entry.check(kind, module, settings))
        kept.append(plan_target(entry, kind, module, settings))
    return kept


def _supports(entry: Method, module: nn.Module) -> bool:
    kind = find_kind(module)
    return kind is not None and entry.supports(kind)


def plan_target(
    entry: Method, kind: LayerKind, module: nn.Module, settings: Settings
) -> PlannedTarget:
    fan_in, fan_out = kind.features(module)
    bare = replace(settings, target="", adapter="")  # type: ignore[type-var]
    key = (entry.name, kind.name, type(module), kind.shape_key(module), bare)
    if key not in _PARAM_COUNTS:  # layers of one shape have one count: build one meta branch
        branch, _ = entry.make_branch(kind, kind.meta_twin(module), settings)
        tensors = list(branch.parameters())
        frozen = sum(p.numel() for p in tensors if not p.requires_grad)
        _PARAM_COUNTS[key] = (sum(p.numel() for p in tensors), frozen)
    params, frozen = _PARAM_COUNTS[key]
    return PlannedTarget(
        adapter=settings.adapter,
        path=settings.target,
        layer_type=kind.name,
        in_features=fan_in,
        out_features=fan_out,
        params=params,
        method=entry.name,
        settings=settings,
        frozen_params=frozen,
    )


_PARAM_COUNTS: dict[tuple[Any, ...], tuple[int, int]] = {}  # (params, frozen_params)
