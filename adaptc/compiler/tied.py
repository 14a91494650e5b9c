"""Tied weights in the compiler: tied branches, and merging into a weight layers share.

A transformers model with ``tie_word_embeddings`` holds one ``nn.Parameter`` in its input
embedding and its output head; the compiled copy keeps the tie (:mod:`~adaptc.compiler.clone`).

- :func:`tie_branches`: a planned target whose settings name ``tied_to`` (the head of
  LoRA's ``ensure_weight_tying``, trainable tokens on a tied head) gets its branch tied to
  the branch on that path by its method (:meth:`~adaptc.methods.base.Method.tie`).
- :func:`merge_tied`: merging folds every branch of every layer holding a shared weight
  into *one* new weight, which all of them then hold: the tie survives the merge, as in
  PEFT, whose merge writes into the shared parameter. So LoRA on a tied embedding also
  changes the head (PEFT does the same), and a branch tied to another on the same weight
  adds nothing of its own (PEFT adds ``ensure_weight_tying``'s update twice: the one
  deliberate difference, docs/peft-migration.md).
- :func:`untie_config`: PEFT's rule after merging: a model whose input and output
  embeddings no longer share a weight gets ``config.tie_word_embeddings = False``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adaptc.compiler.passes import MergeError
from adaptc.layers import find_kind
from adaptc.methods.base import Branch
from adaptc.methods.registry import branches_of, method, method_of

__all__ = ["merge_tied", "tie_branches", "untie_config"]


def tie_branches(targets: Sequence[Any], built: Mapping[tuple[str, str, str], Branch]) -> None:
    """Tie each built branch whose planned target names ``tied_to`` to its source's.

    ``targets`` are planned targets, ``built`` their branches by ``(adapter, method,
    path)``. The source is built first (the plan puts tied targets after their sources)."""
    for target in targets:
        source = getattr(target.settings, "tied_to", None)
        if source is None:
            continue
        key = (target.adapter, target.method, target.path)
        origin = built.get((target.adapter, target.method, source))
        if origin is None:
            raise ValueError(
                f"{target.path}: tied to {source}, which has no {target.method} branch of "
                f"adapter {target.adapter!r}"
            )
        method(target.method).tie(built[key], origin, target.settings)


def _original_path(path: str) -> str:
    return path.replace(".base_layer", "").removesuffix("base_layer")


@torch.no_grad()
def merge_tied(model: nn.Module, adapters: Sequence[str], *, safe: bool) -> list[str]:
    """Merge ``adapters`` into the weights several layers of ``model`` share (in place:
    ``model`` is the merge's own copy); returns warnings naming the layers that change
    without an adapter of their own.

    Each shared weight gets one new parameter: the weight with the branches of each layer
    holding it folded in, layer after layer, except a branch tied to another layer of the
    group. Those layers lose their branches; the others are left to the merge pass."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, Branch):
            continue
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((_original_path(path), module, name))
                params[id(p)] = p
    notes: list[str] = []
    for key, group in holders.items():
        layers = [(path, m) for path, m, _ in group if branches_of(m, adapters)]
        if len(group) < 2 or not layers or not _mergeable(group, params[key]):
            continue
        sources = {b.target for _, m in layers for b in branches_of(m, adapters)}
        weight: torch.Tensor = params[key]
        biases: dict[int, torch.Tensor | None] = {}
        own_updates: list[str] = []  # the layers whose own update goes into the weight
        for path, layer in layers:
            kind = find_kind(layer)
            assert kind is not None
            bias = getattr(layer, "bias", None)
            for branch in branches_of(layer, adapters):
                if getattr(branch, "tied_to", None) in sources:
                    continue  # it follows a branch merged here already
                if path not in own_updates:
                    own_updates.append(path)
                weight, bias = method_of(branch).merge(kind, layer, branch, weight, bias)
                if safe and not torch.isfinite(weight).all():
                    raise MergeError(
                        f"merging adapter {branch.adapter!r} into {branch.target} gives "
                        "non-finite weights; the adapter seems broken"
                    )
            biases[id(layer)] = bias
        shared = nn.Parameter(weight.detach(), requires_grad=False)
        for _, module, name in group:
            module._parameters[name] = shared
        for _, layer in layers:
            bias = biases[id(layer)]
            own = layer._parameters.get("bias")
            if bias is not None and bias is not own:
                layer._parameters["bias"] = nn.Parameter(bias.detach(), requires_grad=False)
            layer._modules = {k: c for k, c in layer._modules.items() if not isinstance(c, Branch)}
        merged = {p for p, _ in layers}
        others = sorted({p for p, _, _ in group} - merged)
        if others:
            notes.append(
                f"merging into {', '.join(sorted(merged))} also changes {', '.join(others)}, "
                "whose weight is tied to it (as in PEFT); untie the weights before compiling "
                "to keep the tied layer as it was"
            )
        if len(own_updates) > 1:
            notes.append(
                f"{' and '.join(own_updates)} share their weight (tied) and each has its own "
                "adapter: the merged weight holds both updates, so each layer gets the other's "
                "too (as in PEFT); ensure_weight_tying gives tied layers one adapter"
            )
    return notes


def _mergeable(group: list[tuple[str, nn.Module, str]], param: nn.Parameter) -> bool:
    """Whether the shared tensor is the plain weight of each layer holding it that carries
    branches (not a quantized one: those merge on their own)."""
    for _, module, name in group:
        if not any(isinstance(c, Branch) for c in module.children()):
            continue
        kind = find_kind(module)
        if kind is None or kind.quantized or name != "weight" or kind.weight(module) is not param:
            return False
    return True


def untie_config(model: nn.Module) -> list[str]:
    """PEFT's check after merging: ``tie_word_embeddings`` set to False (with a warning)
    when the input and output embeddings of ``model`` no longer share their weight."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return []
    try:
        inputs = model.get_input_embeddings()  # type: ignore[operator]
        outputs = model.get_output_embeddings()  # type: ignore[operator]
    except (NotImplementedError, AttributeError, TypeError):
        return []
    first = getattr(inputs, "weight", None)
    second = getattr(outputs, "weight", None)
    if not isinstance(first, torch.Tensor) or not isinstance(second, torch.Tensor):
        return []
    if first.data_ptr() == second.data_ptr():
        return []
    config.tie_word_embeddings = False
    return [
        "Input and output embeddings are no longer tied after merging. Setting "
        "`tie_word_embeddings=False` in the model config."
    ]
