"""Weight tying as PEFT sees it: the input embedding and the layers tied to it.

transformers ties a causal LM's output head to its input embedding (one ``nn.Parameter``
held by both modules) when ``config.tie_word_embeddings`` is set; the model names the
ties in ``_tied_weights_keys`` (``{"lm_head.weight": "model.embed_tokens.weight"}``).
PEFT reads them to keep adapters on tied layers in step (``ensure_weight_tying``, trainable
tokens); these helpers answer its questions the same way, on the user's model (the
methods that adapt tied layers share them: LoRA and trainable tokens).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "EMBEDDING_LAYER_NAMES",
    "input_embedding_path",
    "tied_paths",
    "tied_with_input_embedding",
    "ties_word_embeddings",
]

# PEFT's names of embedding layers (its EMBEDDING_LAYER_NAMES): the last segment of a path
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        found = get()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


def input_embedding_path(model: nn.Module, default: str | None = None) -> str | None:
    """The path of the model's input embedding (``get_input_embeddings()``), or
    ``default`` when it has none (PEFT's ``_get_input_embeddings_name``)."""
    embedding = _input_embedding(model)
    if embedding is not None:
        for path, module in model.named_modules():
            if module is embedding:
                return str(path)
    return default


def ties_word_embeddings(model: nn.Module) -> bool:
    """``config.tie_word_embeddings`` (False without a config), as PEFT reads it."""
    config: Any = getattr(model, "config", None)
    if isinstance(config, dict):
        return bool(config.get("tie_word_embeddings", False))
    return bool(getattr(config, "tie_word_embeddings", False))


def tied_with_input_embedding(model: nn.Module) -> list[str]:
    """The paths of the modules whose weight is tied to the input embedding's, sorted
    (``["lm_head"]`` for a tied Llama): PEFT's ``_get_module_names_tied_with_embedding``.

    Empty when ``config.tie_word_embeddings`` is False or the model declares no
    ``_tied_weights_keys``; a tie counts when the model declares it *and* both modules
    hold the very parameter of the input embedding."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    declared = getattr(model, "_tied_weights_keys", None)
    if declared is None:
        return []
    if not isinstance(declared, dict):  # transformers 4's list of tied parameter names
        return sorted({str(name).rpartition(".")[0] for name in declared})
    embedding = _input_embedding(model)
    if embedding is None:
        return []
    ties: dict[str, str] = {}
    for path, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, dict) and keys:
            prefix = f"{path}." if path else ""
            ties.update({f"{prefix}{k}": f"{prefix}{v}" for k, v in keys.items()})
    own = {id(p) for p in embedding.parameters()}
    candidates = {
        name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in own
    }
    return sorted({k.rpartition(".")[0] for k, v in ties.items() if v in candidates})


def tied_paths(model: nn.Module, source: str) -> list[str]:
    """The paths PEFT ties to the input embedding at ``source`` when it adapts it (trainable
    tokens): every module path, shared modules under each of their names, that ends with
    the name of a module tied to it, when the model ties its word embeddings."""
    if not ties_word_embeddings(model):
        return []
    names = tied_with_input_embedding(model)
    found = []
    for path, _ in model.named_modules(remove_duplicate=False):
        if path and path != source and any(path.endswith(n) for n in names):
            found.append(path)
    return list(dict.fromkeys(found))
