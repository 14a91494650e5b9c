"""PEFT's adapter state dict: which tensors an adapter file holds, under which keys.

Keys are those PEFT writes: ``base_model.model.<module path>.<tensor>``, the adapter name
removed. A branch's tensors are named by its method (``Branch.file_tensors``: LoRA's
``lora_A.weight``, ``lora_B.weight``/``.bias``, ``lora_embedding_A``/``_B``,
``lora_magnitude_vector``; IA3's ``ia3_l``); biases trained by the bias mode
and ``modules_to_save`` copies are stored under the original module paths, with PEFT's
``base_layer`` segment for layers that carry an adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from adaptc.compiler import compiled
from adaptc.compiler.saved import ModulesToSave
from adaptc.methods.base import Branch

__all__ = [
    "PREFIX",
    "AdapterKeyError",
    "AdapterShapeError",
    "adapter_branches",
    "adapter_state_dict",
    "adapter_tensors",
    "is_base_tensor",
    "saved_modules",
    "target_layers",
    "without_peft_duplicates",
]

PREFIX = "base_model.model."
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT saves their base weights too


class AdapterKeyError(ValueError):
    """An adapter file does not fit the model (missing, unexpected or mis-shaped tensors)."""


class AdapterShapeError(AdapterKeyError, RuntimeError):
    """A tensor of an adapter file has another shape than the model's. Also a
    ``RuntimeError``: what torch's and peft's loaders raise for a "size mismatch", which
    users' code may catch."""


def adapter_tensors(model: nn.Module, adapter: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(PEFT key, tensor of the compiled model)`` for every tensor the adapter file holds."""
    info = compiled(model, "saving an adapter")
    targets = {t.path for t in info.plan.targets if t.adapter == adapter}
    shared: dict[str, torch.Tensor] = {}  # model-level tensors the branches share, once each
    for branch in adapter_branches(model, adapter):
        where = branch.file_path  # the target's path (a parameter's: its module's, nested)
        for name, param in branch.file_tensors():  # cut to the true rank when padded
            yield f"{PREFIX}{where}.{name}", param
        for key, tensor in branch.model_file_tensors():
            shared.setdefault(key, tensor)
    yield from shared.items()
    settings = info.spec.adapters[adapter]
    if getattr(settings, "bias", "none") != "none":
        params = _params_by_original_name(model)
        names: dict[int, list[str]] = {}  # a bias held twice (a replicated layer's): both names
        for name, p in params.items():
            names.setdefault(id(p), []).append(name)
        for first, _ in info.plan.trainable_biases:
            if first not in params:  # e.g. the bias of a saved module: saved with its copy
                continue
            for name in names[id(params[first])]:
                owner = name.rpartition(".")[0]
                key = f"{owner}.base_layer.bias" if owner in targets else name
                yield f"{PREFIX}{key}", params[name]
    for path, wrapper in saved_modules(model):
        if adapter not in wrapper.modules_to_save:
            continue
        for name, tensor in wrapper.modules_to_save[adapter].state_dict(keep_vars=True).items():
            yield f"{PREFIX}{path}.{name}", tensor
    mine = [t for t in info.plan.targets if t.adapter == adapter]
    if _saves_embeddings(settings, mine, (p for p, _ in _original_paths(model))):
        tied = {t.path for t in info.plan.targets if t.adapter == adapter and _tied_to(t)}
        tied |= {_tied_to(t) for t in info.plan.targets if t.adapter == adapter and _tied_to(t)}
        for path in sorted(targets):
            if path.rpartition(".")[2] in _EMBEDDING_LAYER_NAMES or path in tied:
                weight = _layer(model, path).weight
                assert isinstance(weight, torch.Tensor)
                yield f"{PREFIX}{path}.base_layer.weight", weight


def without_peft_duplicates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the copies peft writes twice: with ``bias: all`` its file also holds
    a saved module's biases under ``<path>.modules_to_save.bias`` and
    ``<path>.original_module.bias`` beside the real ``<path>.bias``; peft never reads them."""
    return {
        k: v
        for k, v in state.items()
        if not (".modules_to_save." in k or ".original_module." in k) or ".lora_" in k
    }


def is_base_tensor(key: str) -> bool:
    """Whether an adapter file's ``key`` is a base weight PEFT saves beside the adapter
    (a targeted embedding's), which is shared with the user's model."""
    return ".base_layer." in key and ".lora_" not in key and not key.endswith(".bias")


def adapter_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter file's contents: detached, contiguous tensors by PEFT key."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in adapter_tensors(model, adapter):
        out[key] = tensor.detach().contiguous()
        if id(tensor) in seen:  # a tensor held twice is written twice, as peft does
            out[key] = out[key].clone()
        seen.add(id(tensor))
    return out


def adapter_branches(model: nn.Module, adapter: str) -> list[Branch]:
    """The adapter's branches, one per target (a shared layer's branch once)."""
    seen: dict[str, Branch] = {}
    for module in model.modules():
        if isinstance(module, Branch) and module.adapter == adapter:
            seen.setdefault(module.target, module)
    return [seen[k] for k in seen]


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """``(path in the user's model, wrapper)`` for each ``modules_to_save`` wrapper."""
    for path, module in _original_paths(model):
        if isinstance(module, ModulesToSave):
            yield path, module


def _original_paths(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules by their path in the user's model (graph wrappers' ``base_layer`` removed)."""
    for path, module in model.named_modules(remove_duplicate=False):
        yield path.replace(".base_layer", "").removesuffix("base_layer"), module


def _params_by_original_name(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, module in _original_paths(model):
        if isinstance(module, Branch):
            continue
        for name, p in module.named_parameters(recurse=False):
            out.setdefault(f"{path}.{name}" if path else name, p)
    return out


def target_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path in the user's model, layer)`` for each layer carrying adapter branches."""
    seen: set[int] = set()
    for path, module in _original_paths(model):
        if id(module) not in seen and any(isinstance(c, Branch) for c in module.children()):
            seen.add(id(module))
            yield path, module


def _layer(model: nn.Module, path: str) -> nn.Module:
    for original, module in _original_paths(model):
        if original == path and any(isinstance(c, Branch) for c in module.children()):
            return module
    raise KeyError(path)


def _tied_to(target: Any) -> Any:
    return getattr(target.settings, "tied_to", None)


def _saves_embeddings(settings: object, targets: list[Any], paths: Iterable[str]) -> bool:
    """PEFT's ``save_embedding_layers="auto"``: ``target_modules`` (as PEFT has it after
    ``ensure_weight_tying`` added the input embedding and dropped the tied layers' names)
    names an embedding layer, or is a regex matching a module ``paths`` so names, and the
    adapter trains no token rows."""
    if getattr(settings, "method", None) == "trainable_tokens":
        return False
    if getattr(settings, "trainable_token_indices", None) is not None:
        return False
    selector = getattr(settings, "targets", None)
    kind = getattr(selector, "kind", None)
    tied = [t for t in targets if _tied_to(t) and t.method == getattr(settings, "method", None)]
    if kind == "regex":
        pattern = str(getattr(selector, "pattern", ""))
        if tied:  # PEFT's _add_targets_to_tie
            pattern = rf"(?:{pattern}|^{re.escape(_tied_to(tied[0]))}$)"
        named = re.compile(rf"(.*\.)?({'|'.join(_EMBEDDING_LAYER_NAMES)})$")
        return any(named.match(p) and re.fullmatch(pattern, p) for p in paths)
    if kind != "names":
        return False
    names = list(getattr(selector, "names", ()))
    if tied:  # PEFT's _add_targets_to_tie
        names.append(_tied_to(tied[0]))
        for key in (t.path for t in tied):
            hit = next((m for m in names if re.match(rf"(^|.*\.){m}($|\..*)", key)), None)
            if hit is not None:
                names.remove(hit)
    return any(n in names for n in _EMBEDDING_LAYER_NAMES)
