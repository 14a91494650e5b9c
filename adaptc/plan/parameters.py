"""Targeted parameters as PEFT resolves ``target_parameters`` (``_inject_parameters``).

A parameter ``P`` of the module at ``M`` (its own, not a child's) is targeted when
``M.P`` equals an entry or ends with ``.`` + entry. ``layers`` and ``exclude`` do not
apply to parameters (nor in PEFT). A module that ``targets`` also selects cannot have
its parameters targeted, nor can the model's root module (PEFT refuses both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from adaptc.layers import ParameterSlot
from adaptc.plan.match import TargetError, closest_names

__all__ = ["ParameterMatch", "is_transposed", "resolve_parameters"]


@dataclass(frozen=True)
class ParameterMatch:
    """The targeted parameters (their slots, by full path, in model order) and warnings."""

    slots: tuple[tuple[str, ParameterSlot], ...]
    warnings: tuple[str, ...] = ()


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its experts' matrices ``(experts, in, out)`` (transformers'
    ``is_transposed``, set by ``use_experts_implementation``; PEFT reads the same)."""
    return bool(getattr(module, "is_transposed", False))


def resolve_parameters(
    model: nn.Module, entries: Sequence[str], module_targets: Sequence[str]
) -> ParameterMatch:
    """The parameters of ``model`` that ``entries`` (``target_parameters``) select."""
    wanted = tuple(entries)
    modules = set(module_targets)
    found: list[tuple[str, ParameterSlot]] = []
    used: set[str] = set()
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            hits = [e for e in wanted if key == e or key.endswith(f".{e}")]
            if not hits:
                continue
            used.update(hits)
            if not path:
                raise TargetError(
                    f"target_parameters: {key!r} belongs to the model's root module, which "
                    "cannot be adapted (nor in PEFT); target a submodule's parameter"
                )
            if path in modules:
                raise TargetError(
                    f"target_parameters: {key!r} belongs to {path!r}, which targets also "
                    "selects; a module is adapted either as a layer or through its "
                    "parameters (as in PEFT)"
                )
            try:
                slot = ParameterSlot(path, name, param, is_transposed(module))
            except ValueError as exc:
                raise TargetError(str(exc)) from None
            found.append((key, slot))
    warnings = []
    unused = [e for e in wanted if e not in used]
    if unused:
        names = [f"{p}.{n}" if p else n for p, m in model.named_modules() for n, _ in
                 m.named_parameters(recurse=False)]  # fmt: skip
        for entry in unused:
            close = closest_names((entry,), names)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            warnings.append(f"target_parameters entry {entry!r} matched no parameter{hint}")
    return ParameterMatch(tuple(found), tuple(warnings))
