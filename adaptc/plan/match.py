"""Target resolution: which modules of a model get an adapter, decided exactly as PEFT does.

PEFT 0.21.2 (``check_target_module_exists``, ``inject_adapter``) visits every path ``key`` of
``model.named_modules()`` but the root, and asks in this order:

1. ``exclude``: names drop ``key == e`` or ``key.endswith("." + e)``; a regex drops a fullmatch.
2. ``modules_to_save``: ``re.match(rf"(^|.*\\.){m}($|\\..*)", key)`` drops it (``m`` is *not*
   escaped: ``layers.0`` also drops ``layersX0``).
3. ``targets``: names as in 1.; regex fullmatch; ``all-linear`` is the set of ``nn.Linear`` /
   ``Conv1D`` paths minus the output head, used as a *name list* (so a path ending in
   ``"." + one of them`` matches too); ``types`` (adaptc only) is ``isinstance``.
4. ``layers``: the layer index is the first number preceded by at least two name segments
   (``blocks.0.fc`` has none) or, with ``pattern``, the first ``…pattern.N.``; it must be in
   ``indices``. A names entry equal to the whole path skips this check; a regex ignores it.
   PEFT refuses ``layers`` with ``all-linear``; adaptc filters those targets like names.

``modules_to_save`` wraps every path (duplicates included) with ``key.endswith(m)``: a plain
string suffix, so ``proj`` also saves ``q_proj`` (PEFT then fails if it is a LoRA target).

Example: OPT with ``targets: {kind: names, names: [q_proj]}`` and ``layers: {indices: [1]}``
resolves to ``("model.decoder.layers.1.self_attn.q_proj",)``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from adaptc.layers import find_kind, kind_names, kinds
from adaptc.plan.defaults import LORA_TARGET_MODULES, SEQ_CLS_HEAD_NAMES, TASK_MODULES_TO_SAVE
from adaptc.spec.model import (
    LAYER_TYPES,
    AllLinearTargets,
    LayerSelection,
    NameTargets,
    NoTargets,
    RegexTargets,
    TypeTargets,
)

__all__ = [
    "TargetError",
    "TargetMatch",
    "closest_names",
    "layer_type_name",
    "model_type",
    "resolve_targets",
]

# PEFT's ModulesToSaveWrapper refuses these (it cannot call them).
_NOT_SAVABLE = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
# PEFT's layer index without `layers.pattern`: the first number preceded by two segments.
_FIRST_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
_MAX_CLOSE = 5


@dataclass(frozen=True)
class TargetMatch:
    """What one adapter does to a model: its branches on ``targets``, trainable copies of
    ``modules_to_save`` (paths as in ``named_modules()``, in its order), and ``warnings``."""

    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    warnings: tuple[str, ...] = ()


class TargetError(ValueError):
    """The adapter's targets do not fit the model; the message is one line for the user."""


def layer_type_name(module: nn.Module) -> str | None:
    """The spec's type name of ``module``: its layer kind's name, or None."""
    kind = find_kind(module)
    return None if kind is None else kind.name


@dataclass(frozen=True)
class _Selector:
    """One compiled ``targets`` selector; ``label`` names it in messages."""

    label: str
    names: frozenset[str] | None = None
    regex: re.Pattern[str] | None = None
    kinds: frozenset[str] = frozenset()  # layer kind names
    queries: tuple[str, ...] = ()  # what the user typed, for "closest names"
    exact_skips_layers: bool = False  # PEFT: `key in target_modules` bypasses the layer check
    layers_apply: bool = True  # PEFT ignores layers for a regex
    warn_unmatched: bool = False
    none: bool = False  # selects no module (an adapter of parameters only)

    def hits(self, key: str, module: nn.Module) -> list[str] | None:
        """The entries ``key`` matches (``[]`` for regex/types), or None when it does not."""
        if self.names is not None:
            found = _suffix_hits(self.names, key)
            return found or None
        if self.regex is not None:
            return [] if self.regex.fullmatch(key) else None
        return [] if layer_type_name(module) in self.kinds else None


def resolve_targets(
    model: nn.Module,
    adapter: Any,
    *,
    supported: Callable[[nn.Module], bool] | None = None,
    supported_names: Sequence[str] = (),
    task_type: str | None = None,
    method: str = "LoRA",
    default_targets: Mapping[str, tuple[str, ...] | str] = LORA_TARGET_MODULES,
    parameters: bool = False,
) -> TargetMatch:
    """The modules of ``model`` that PEFT would adapt (and save) for ``adapter`` (a method's
    spec model: its ``targets``, ``exclude``, ``layers`` and ``modules_to_save``).

    ``supported`` says whether the ``method`` can wrap a module (default: any layer type
    the spec names, as PEFT would adapt it); ``task_type`` is the spec's, as it changes
    the head PEFT saves and leaves out of ``all-linear``; ``default_targets`` are the
    method's targets by model type when the adapter names none. ``parameters``: the
    adapter also targets parameters, so no module may be selected (``targets: {kind:
    none}``, or omitted where PEFT has no default targets). Never touches weights.
    """
    modules = [(key, module) for key, module in model.named_modules() if key]
    task = TASK_MODULES_TO_SAVE.get(task_type or "")
    guarded = adapter.modules_to_save + (task.names if task and task.guards_targets else ())
    guards = [re.compile(rf"(^|.*\.){m}($|\..*)") for m in guarded]
    selector = _selector(model, adapter, modules, task_type, default_targets, parameters)
    excluded = _exclusion(adapter)
    layers = adapter.layers if selector.layers_apply else None
    patterns = _layer_patterns(layers)
    warnings: list[str] = []
    if adapter.layers is not None and not selector.layers_apply:
        warnings.append(f"layers is ignored: {selector.label} is a regex (as in PEFT)")

    targets: list[tuple[str, nn.Module]] = []
    used_entries: set[str] = set()
    removed = {"exclude": 0, "modules_to_save": 0, "layers": 0}
    seen_indices: set[int] = set()
    exclude_used = False
    for key, module in modules:
        is_excluded = excluded(key)
        exclude_used = exclude_used or is_excluded
        hits = selector.hits(key, module)
        if hits is None:
            continue
        used_entries.update(hits)
        if is_excluded:
            removed["exclude"] += 1
        elif any(g.match(key) for g in guards):
            removed["modules_to_save"] += 1
        elif layers is None or (selector.exact_skips_layers and key in hits):
            if layers is not None and _layer_index(key, patterns) not in layers.indices:
                warnings.append(
                    f"{key!r} is named in full in {selector.label}, so layers does not "
                    "filter it (as in PEFT)"
                )
            targets.append((key, module))
        else:
            index = _layer_index(key, patterns)
            if index is not None:
                seen_indices.add(index)
            if index in layers.indices:
                targets.append((key, module))
            else:
                removed["layers"] += 1

    if not targets and not selector.none:
        matched = sum(removed.values())
        if not matched:
            raise TargetError(_no_match(model, modules, selector))
        raise TargetError(_all_removed(model, selector, matched, removed, seen_indices, layers))
    _check_supported(targets, selector, supported, supported_names, method)

    if selector.warn_unmatched and selector.names is not None:
        for entry in sorted(selector.names - used_entries):
            close = closest_names((entry,), [k for k, _ in modules])
            hint = f"; did you mean {close[0]!r}?" if close else ""
            warnings.append(f"targets.names entry {entry!r} matched no module{hint}")
    if adapter.exclude is not None and not exclude_used:
        warnings.append(f"{_label(adapter.exclude, 'exclude')} matched no module")

    saved = _modules_to_save(model, adapter, task_type, {k for k, _ in targets}, selector.label)
    for entry in adapter.modules_to_save:
        if task is not None and entry in task.names:
            continue  # peft lists every task head it tries; an absent one is not a mistake
        if not any(key.endswith(entry) for key in saved):
            warnings.append(f"modules_to_save entry {entry!r} matched no module")
    return TargetMatch(tuple(k for k, _ in targets), saved, tuple(warnings))


def _modules_to_save(
    model: nn.Module, adapter: Any, task_type: str | None, targets: set[str], label: str
) -> tuple[str, ...]:
    """PEFT's ``_set_trainable``: every path (shared modules too) ending with an entry."""
    task = TASK_MODULES_TO_SAVE.get(task_type or "")
    entries = tuple(dict.fromkeys(adapter.modules_to_save + (task.names if task else ())))
    saved: list[str] = []
    for key, module in model.named_modules(remove_duplicate=False):
        entry = next((m for m in entries if key.endswith(m)), None) if key else None
        if entry is None:
            continue
        why = (
            f"modules_to_save entry {entry!r} (a plain suffix match, as in PEFT)"
            if entry in adapter.modules_to_save
            else f"task_type {task_type}, which saves {entry!r} as in PEFT"
        )
        if isinstance(module, _NOT_SAVABLE):
            raise TargetError(
                f"{key!r} ({type(module).__name__}) is selected by {why}, but a container cannot "
                "be trained as a copy: name the layers inside it instead"
            )
        if key in targets:
            raise TargetError(
                f"module {key!r} is selected by {label} and by {why}; it cannot be both: "
                "exclude it from one of them"
            )
        saved.append(key)
    return tuple(saved)


def _selector(
    model: nn.Module,
    adapter: Any,
    modules: Sequence[tuple[str, nn.Module]],
    task_type: str | None,
    default_targets: Mapping[str, tuple[str, ...] | str],
    parameters: bool = False,
) -> _Selector:
    t = adapter.targets
    if isinstance(t, NoTargets) or (
        parameters and t is None and default_targets.get(model_type(model) or "") is None
    ):  # PEFT: target_modules None with target_parameters and no default targets
        return _Selector("no module", names=frozenset(), none=True)
    if isinstance(t, NameTargets):
        names = frozenset(t.names)
        return _Selector(
            _label(t), names=names, queries=t.names, exact_skips_layers=True, warn_unmatched=True
        )
    if isinstance(t, RegexTargets):
        return _Selector(
            _label(t), regex=re.compile(t.pattern), queries=(t.pattern,), layers_apply=False
        )
    if isinstance(t, AllLinearTargets):
        return _Selector(_label(t), names=_all_linear(model, modules, task_type))
    if isinstance(t, TypeTargets):
        return _Selector(_label(t), kinds=frozenset(t.types))
    return _default_selector(model, default_targets)


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of a transformers model (PEFT's key for its defaults), or None."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        found = config.get("model_type")
    else:
        found = getattr(config, "model_type", None)
    return found if isinstance(found, str) and found else None


def _default_selector(
    model: nn.Module, default_targets: Mapping[str, tuple[str, ...] | str]
) -> _Selector:
    kind = model_type(model)
    if kind is None:
        raise TargetError(
            f"targets is omitted, but {type(model).__name__} has no config.model_type to look up "
            "PEFT's default targets; set targets (e.g. kind: all-linear)"
        )
    default = default_targets.get(kind)
    if default is None:
        raise TargetError(
            f"targets is omitted, but PEFT has no default targets for model type {kind!r}; "
            "set targets (e.g. kind: all-linear)"
        )
    label = f"PEFT's default targets for model type {kind!r}"
    if isinstance(default, str):
        return _Selector(
            f"{label} `{default}`",
            regex=re.compile(default),
            queries=(default,),
            layers_apply=False,
        )
    return _Selector(
        f"{label} [{', '.join(default)}]",
        names=frozenset(default),
        queries=default,
        exact_skips_layers=True,
    )


def _all_linear(
    model: nn.Module, modules: Sequence[tuple[str, nn.Module]], task_type: str | None
) -> frozenset[str]:
    """PEFT's ``_maybe_include_all_linear_layers``: linear paths minus the output head."""
    linear = tuple(kind for kind in kinds() if kind.linear)
    names = {key for key, module in modules if any(kind.matches(module) for kind in linear)}
    if isinstance(model, PreTrainedModel):
        head: object = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        if head is None and task_type == "SEQ_CLS":
            head = next(
                (h for n in SEQ_CLS_HEAD_NAMES if (h := getattr(model, n, None)) is not None), None
            )
        if head is not None:
            names.discard(next((k for k, m in model.named_modules() if m is head), ""))
    return frozenset(names)


def _exclusion(adapter: Any) -> Callable[[str], bool]:
    exclude = adapter.exclude
    if isinstance(exclude, NameTargets):
        names = frozenset(exclude.names)
        return lambda key: bool(_suffix_hits(names, key))
    if isinstance(exclude, RegexTargets):
        regex = re.compile(exclude.pattern)
        return lambda key: regex.fullmatch(key) is not None
    return lambda key: False


def _suffix_hits(names: frozenset[str], key: str) -> list[str]:
    """Entries ``e`` of ``names`` with ``key == e`` (first) or ``key.endswith("." + e)``."""
    found = [key] if key in names else []
    dot = key.find(".")
    while dot != -1:
        tail = key[dot + 1 :]
        if tail in names:
            found.append(tail)
        dot = key.find(".", dot + 1)
    return found


def _layer_patterns(layers: LayerSelection | None) -> tuple[re.Pattern[str], ...]:
    if layers is None or not layers.pattern:
        return ()
    return tuple(re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in layers.pattern)


def _layer_index(key: str, patterns: tuple[re.Pattern[str], ...]) -> int | None:
    """PEFT's layer index of ``key``: the first match of the first pattern that matches."""
    match = None if patterns else _FIRST_INDEX.match(key)
    for pattern in patterns:
        match = pattern.match(key)
        if match is not None:
            break
    index = match.groupdict().get("idx") if match is not None else None
    return None if index is None else int(index)


def _check_supported(
    targets: Sequence[tuple[str, nn.Module]],
    selector: _Selector,
    supported: Callable[[nn.Module], bool] | None,
    supported_names: Sequence[str],
    method: str,
) -> None:
    if supported is None:
        names = set(kind_names())
        supported, supported_names = _has_type_name, [n for n in LAYER_TYPES if n in names]
    listed = f"; supported: {', '.join(supported_names)}" if supported_names else ""
    for key, module in targets:
        if supported(module):
            continue
        cls = type(module).__name__
        inner = next((f"{key}.{k}" for k, m in module.named_modules() if k and supported(m)), None)
        if inner is not None and find_kind(module) is None:  # a layer (MHA) holds layers too
            raise TargetError(
                f"module {key!r} ({cls}) is selected by {selector.label}, but it is a container, "
                f"not a layer: select its layers instead (e.g. {inner!r}){listed}"
            )
        raise TargetError(
            f"module {key!r} ({cls}) is selected by {selector.label}, but {method} does not "
            f"support its type{listed}"
        )


def _has_type_name(module: nn.Module) -> bool:
    """Whether ``module`` has a layer kind (the types PEFT adapts)."""
    return layer_type_name(module) is not None


def _no_match(
    model: nn.Module, modules: Sequence[tuple[str, nn.Module]], selector: _Selector
) -> str:
    close = closest_names(selector.queries, [k for k, _ in modules])
    hint = f"; closest names: {', '.join(close)}" if close else ""
    return (
        f"{selector.label} matched no module of {type(model).__name__}{hint}; "
        f"model has: {_type_summary(modules)}"
    )


def _all_removed(
    model: nn.Module,
    selector: _Selector,
    matched: int,
    removed: dict[str, int],
    seen_indices: set[int],
    layers: LayerSelection | None,
) -> str:
    parts = [f"{field} removed {n}" for field, n in removed.items() if n]
    if removed["layers"] and layers is not None:
        wanted = ", ".join(map(str, layers.indices))
        found = ", ".join(map(str, sorted(seen_indices))) or "none"
        parts[-1] += f" (indices {wanted}; layer indices in their paths: {found})"
    return (
        f"{selector.label} matched {matched} module(s) of {type(model).__name__}, but none is "
        f"left: {', '.join(parts)}"
    )


def closest_names(queries: Iterable[str], keys: Sequence[str]) -> list[str]:
    """Up to five module names like ``queries``: last components, same-depth tails, paths."""
    found: list[str] = []
    for query in queries:
        depth = query.count(".") + 1
        tails = [".".join(k.split(".")[-depth:]) for k in keys]
        candidates = list(dict.fromkeys([k.rsplit(".", 1)[-1] for k in keys] + tails + list(keys)))
        for name in difflib.get_close_matches(query, candidates, n=_MAX_CLOSE, cutoff=0.6):
            if name not in found:
                found.append(name)
    return found[:_MAX_CLOSE]


def _type_summary(modules: Sequence[tuple[str, nn.Module]]) -> str:
    """``Linear×24, Embedding×2, …``: layer types (leaves and LoRA-able), first seen first."""
    counts: dict[str, int] = {}
    for _, module in modules:
        if next(module.children(), None) is None or layer_type_name(module) is not None:
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name}×{n}" for name, n in counts.items()) or "no layers"


def _label(
    selector: NameTargets | RegexTargets | AllLinearTargets | TypeTargets, field: str = "targets"
) -> str:
    if isinstance(selector, NameTargets):
        return f"{field}.names [{', '.join(selector.names)}]"
    if isinstance(selector, RegexTargets):
        return f"{field}.pattern `{selector.pattern}`"
    if isinstance(selector, TypeTargets):
        return f"{field}.types [{', '.join(selector.types)}]"
    return f"{field} all-linear"
