"""EVA on a compiled model: LoRA's ``A`` from the SVD of each target layer's inputs over a
dataloader's batches, with the adapter's rank budget redistributed by explained variance
(PEFT's ``get_eva_state_dict`` and ``initialize_lora_eva_weights``).

:func:`eva_state_dict` runs the model with its adapters off (``adaptc.disabled``) and
forward hooks on the adapter's linear target layers, on the compiled model only (the
user's model is never run or hooked). It follows PEFT's loop step by step, so the same
batches give the same components and ranks:

1. the first batch is run once to find layers that get the same input (``q_proj``,
   ``k_proj``, ``v_proj``): one SVD serves them all, with the largest of their
   ``round(r·rho)``;
2. batches are then taken in turn, the dataloader's first pass again and again (as
   ``itertools.cycle`` replays it), each fitting the incremental SVD
   (:class:`~adaptc.methods.lora.eva.IncrementalSVD`) of every layer still running; a
   layer stops once the cosine similarity of each component its current rank needs to the
   previous batch's is ``≥ tau``, and starts again if its rank grows;
3. after each batch the budget (the sum of the targets' ranks) goes to the largest
   explained-variance ratios (:func:`~adaptc.methods.lora.eva.rank_distribution`).

Token positions come from ``prepare_model_inputs_fn`` (by default the
``attention_mask``, and the ``labels`` that are not ``label_mask_value``); a batch giving a
layer fewer positions than its SVD's components is skipped for it. Two differences from
PEFT, where PEFT is wrong: a dataloader whose every batch is too small for a layer raises
an error after its first pass (PEFT loops forever), and ``whiten`` divides each layer's
components once (PEFT divides the shared SVD of equal-input layers once per layer).

:func:`load_eva_state_dict` (and :func:`initialize_eva`, both steps) then gives each layer
its new rank: ``A`` = the components (``B`` stays 0), a new branch where the rank changed
(``lora_alpha`` scaled by ``new_rank / r`` with ``adjust_scaling_factors``), no branch at
rank 0; and rewrites the adapter's spec as PEFT rewrites its config: the targets become the
module names (PEFT's shortest suffixes for 20 and more), ``rank_pattern`` and
``alpha_pattern`` the layers that differ from ``r`` and ``lora_alpha``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from adaptc.adapters.eva_loop import (
    ForwardFn,
    LayerInputsFn,
    ModelInputsFn,
    collect,
    forward_dict,
    language_modeling_inputs,
    language_modeling_positions,
)
from adaptc.adapters.manage import _layers_by_original_path
from adaptc.adapters.switch import disabled
from adaptc.compiler import AdaptcWarning, Compiled, CompileError, compiled, rebuild
from adaptc.layers import kind_of
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.eva import minimal_suffixes
from adaptc.methods.lora.linear import LinearRule
from adaptc.methods.lora.method import METHOD
from adaptc.methods.lora.spec import EvaSettings, LoraAdapter
from adaptc.plan.plan import PlannedTarget, plan_target
from adaptc.spec import NameTargets

__all__ = [
    "eva_state_dict",
    "forward_dict",
    "initialize_eva",
    "language_modeling_inputs",
    "language_modeling_positions",
    "load_eva_state_dict",
]

_MIN_SUFFIX_TARGETS = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION


@torch.no_grad()
def eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    adapter: str | None = None,
    forward_fn: ForwardFn = forward_dict,
    prepare_model_inputs_fn: ModelInputsFn | None = language_modeling_positions,
    prepare_layer_inputs_fn: LayerInputsFn | Mapping[str, LayerInputsFn] | None = (
        language_modeling_inputs
    ),
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = False,
) -> dict[str, torch.Tensor]:
    """``{target path: A}`` for the linear targets of ``adapter`` of the compiled ``model``:
    each layer's new ``A`` (new_rank, in), its rows the top components of its inputs.

    ``forward_fn(model, batch)`` runs a batch; ``prepare_model_inputs_fn(batch, settings)``
    turns it into what ``prepare_layer_inputs_fn(layer_input, that, layer_path)`` (or a
    mapping of such functions by path) needs to give a layer's (n, in) SVD inputs; None
    for either passes the batch or the layer's first input (flattened) as it is. The
    defaults are PEFT's, for language modelling. The model is left as it was (adapters
    on, its training mode)."""
    info = compiled(model, "eva_state_dict()")
    name, spec = _lora_adapter(info, adapter)
    layers = _eva_layers(model, info, name)
    with disabled(model):
        return collect(
            model, dataloader, layers, spec, forward_fn, prepare_model_inputs_fn,
            prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar,
        )  # fmt: skip


def initialize_eva(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter: str | None = None,
    **options: Any,
) -> nn.Module:
    """EVA for the compiled ``model``'s adapter with ``init: eva``, in place; returns the model.

    From the ``dataloader``'s batches (:func:`eva_state_dict`, whose ``options`` it takes),
    or from a ``state_dict`` computed before; then :func:`load_eva_state_dict`. Works with
    one active adapter (the default ``adapter``), as PEFT's ``initialize_lora_eva_weights``."""
    info = compiled(model, "initialize_eva()")
    if len(info.active) > 1:
        raise CompileError(
            "initialize_eva() works with a single active adapter, as PEFT's "
            f"initialize_lora_eva_weights (active: {', '.join(info.active)})"
        )
    name, spec = _lora_adapter(info, adapter)
    if spec.init != "eva":
        raise CompileError(
            f"adapter {name!r} has init {spec.init!r}: initialize_eva() needs an adapter with "
            "init 'eva' (PEFT's init_lora_weights='eva')"
        )
    if state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_eva() needs a dataloader, or a state_dict computed before")
        state_dict = eva_state_dict(model, dataloader, adapter=name, **options)
    load_eva_state_dict(model, state_dict, adapter=name)
    return model


@torch.no_grad()
def load_eva_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, adapter: str | None = None
) -> None:
    """Give each target of ``adapter`` its EVA rank and ``A`` from ``state_dict`` (by target
    path), in place; targets missing from it get their init again (with a warning)."""
    info = compiled(model, "load_eva_state_dict()")
    if info.merged is not None:
        raise CompileError("load_eva_state_dict(): unmerge the model first (unmerge_in_place)")
    name, spec = _lora_adapter(info, adapter)
    planned = [t for t in info.plan.targets if t.adapter == name]
    for target in planned:  # refused before anything changes
        value = state_dict.get(target.path)
        if value is not None and (value.dim() != 2 or value.shape[1] != target.in_features):
            raise ValueError(
                f"{target.path}: the EVA state dict holds a {tuple(value.shape)} tensor; the "
                f"layer's A is (rank, {target.in_features})"
            )
    ranks = {t.path: int(state_dict[t.path].shape[0]) for t in planned if t.path in state_dict}
    new_spec = _rewritten_spec(model, spec, planned, ranks)
    layers = _layers_by_original_path(model)
    child = METHOD.child_name(name)
    targets: list[PlannedTarget] = []
    missing = []
    for target in planned:
        layer = layers[target.path]
        old = layer._modules[child]
        assert isinstance(old, LoraBranch)
        if ranks.get(target.path) == 0:
            del layer._modules[child]
            continue
        kind = kind_of(layer, target.path)
        settings = METHOD.settings(kind, layer, target.path, name, new_spec)
        if target.path not in ranks or settings != target.settings:  # PEFT's update_layer
            branch, _ = METHOD.make_branch(kind, layer, settings)
            trains = any(p.requires_grad for p in old.parameters())
            for p in branch.parameters():
                p.requires_grad_(trains)
            layer.add_module(child, branch)
        if target.path in ranks:
            new = layer._modules[child]
            assert isinstance(new, LoraBranch)
            new.factors()[0].copy_(state_dict[target.path])
        else:
            missing.append(target.path)
        targets.append(plan_target(METHOD, kind, layer, settings))
    info.spec = info.spec.with_adapters({**info.spec.adapters, name: new_spec})
    info.plan = info.plan.replacing_adapter(name, tuple(targets))
    rebuild(model, info.active)
    if missing:
        warnings.warn(
            f"the following layers were initialized with init {spec.init!r} because they were "
            f"not found in the eva state_dict: {missing} (EVA initialises linear layers only)",
            AdaptcWarning,
            stacklevel=2,
        )


# --- the adapter and its layers ------------------------------------------------------


def _lora_adapter(info: Compiled, adapter: str | None) -> tuple[str, LoraAdapter]:
    name = adapter if adapter is not None else (info.active or tuple(info.spec.adapters))[0]
    if name not in info.spec.adapters:
        raise CompileError(
            f"the model has no adapter {name!r} (has: {', '.join(info.spec.adapters)})"
        )
    spec = info.spec.adapters[name]
    if not isinstance(spec, LoraAdapter):
        raise CompileError(f"adapter {name!r} is a {spec.method} adapter: EVA is for LoRA")
    return name, spec


def _eva_layers(model: nn.Module, info: Compiled, name: str) -> dict[str, nn.Module]:
    """The adapter's target layers EVA initialises (linear kinds), in the model's order."""
    layers = _layers_by_original_path(model)
    out = {}
    for target in info.plan.targets:
        if target.adapter == name and isinstance(METHOD.rules.get(target.layer_type), LinearRule):
            out[target.path] = layers[target.path]
    if not out:
        raise ValueError(f"adapter {name!r} has no linear target layer for EVA")
    return out


def _rewritten_spec(
    model: nn.Module, spec: LoraAdapter, planned: list[PlannedTarget], ranks: dict[str, int]
) -> LoraAdapter:
    """The adapter as PEFT rewrites its config after EVA (see the module docstring)."""
    eva = spec.eva or EvaSettings()
    names, rank_pattern, alpha_pattern = [], {}, {}
    for target in planned:
        r, alpha = target.settings.r, target.settings.lora_alpha  # type: ignore[attr-defined]
        new_rank = ranks.get(target.path, r)
        if new_rank == 0:
            continue
        if new_rank != r and eva.adjust_scaling_factors:
            alpha *= new_rank / r
        names.append(target.path)
        if new_rank != spec.r:
            rank_pattern[target.path] = new_rank
        if alpha != spec.lora_alpha:
            alpha_pattern[target.path] = alpha
    names = [n for n in names if n in ranks] + [n for n in names if n not in ranks]
    if len(names) >= _MIN_SUFFIX_TARGETS:  # PEFT: the shortest suffixes that select them
        kept = set(names)  # (a layer left at rank 0 is one of the others, unlike in PEFT)
        others = [p for p in _layers_by_original_path(model) if p not in kept]
        names = sorted(minimal_suffixes(names, others))
    data = spec.model_dump()
    data.update(
        targets=NameTargets(kind="names", names=tuple(names)).model_dump(),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    return LoraAdapter.model_validate(data)
