"""LoRA's adapter-wide rules that need the model: ``ensure_weight_tying`` and
``trainable_token_indices``, as peft 0.21.2 applies them.

``ensure_weight_tying`` (PEFT's ``_check_tied_modules`` and ``_add_targets_to_tie``): on
a model whose output head is tied to its input embedding, when the targets name an
embedding layer (a names entry ending in ``embed_tokens`` or ``lm_head``, or a regex
matching one of those names), the input embedding becomes a target (an entry matching
a tied layer is dropped from the names) and each tied layer gets a LoRA whose factors
*are* the embedding's, transposed: ``lora_A = lora_embedding_Bᵀ``, ``lora_B =
lora_embedding_Aᵀ`` (views of one storage; each has its own gradient). Its update is the
embedding's, so the head stays the embedding's transpose.

``trainable_token_indices`` (PEFT's ``set_additional_trainable_modules``): rows of
embedding layers train beside the LoRA targets, on the modules whose path ends with each
name (a list: the input embedding); with tied word embeddings the tied head reads the
input embedding's rows, unless the mapping gives it other indices (then it trains its
own, and with ``ensure_weight_tying`` that is refused).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adaptc.layers import find_kind
from adaptc.layers.tying import (
    EMBEDDING_LAYER_NAMES,
    input_embedding_path,
    tied_paths,
    tied_with_input_embedding,
    ties_word_embeddings,
)
from adaptc.methods.base import Branch, Companions, Settings
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.embedding import EmbeddingBranch
from adaptc.methods.lora.rule import BranchConfig
from adaptc.methods.lora.spec import LoraAdapter
from adaptc.methods.registry import method
from adaptc.spec.fields import NameTargets, RegexTargets

if TYPE_CHECKING:
    from adaptc.methods.base import Method

__all__ = ["lora_companions", "tie_lora", "with_tied_targets"]

# inits a tied head can share (PEFT re-initialises the tied factors as a linear layer's)
_TIED_INITS = ("default", "gaussian", "random")
TOKENS = "trainable_tokens"  # the method whose rows trainable_token_indices trains


@dataclass(frozen=True)
class Rows:
    """Rows of one module that ``trainable_token_indices`` trains: what the trainable
    tokens method makes its settings from (PEFT's ``TrainableTokensWrapper``)."""

    path: str
    token_indices: tuple[int, ...]
    tied_to: str | None = None  # a tied head reading the input embedding's rows
    init: str = "copy"
    wrapped: bool = True  # its file keys go under token_adapter., as PEFT's wrapper's


def _embedding_in_targets(targets: Any) -> bool:
    """PEFT's ``is_embedding_in_target``: a names entry whose last segment is an embedding
    name, or a regex matching one of the names themselves."""
    if isinstance(targets, NameTargets):
        return any(n.split(".")[-1] in EMBEDDING_LAYER_NAMES for n in targets.names)
    if isinstance(targets, RegexTargets):
        return any(re.fullmatch(targets.pattern, n) for n in EMBEDDING_LAYER_NAMES)
    return False


def _tying(spec: LoraAdapter, model: nn.Module) -> tuple[bool, list[str]]:
    """Whether ``ensure_weight_tying`` ties targets of ``spec`` on ``model``, and PEFT's
    warnings about tied layers the adapter adapts."""
    to_save = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in spec.modules_to_save)
    in_targets = _embedding_in_targets(spec.targets)
    tied = tied_with_input_embedding(model)
    if spec.ensure_weight_tying:
        if not tied:
            return False, [
                "ensure_weight_tying is set, but no layer of the model is tied to its input "
                "embedding"
            ]
        if to_save:
            raise ValueError(
                "ensure_weight_tying with an embedding layer in modules_to_save is not "
                "supported by adaptc (PEFT ties the saved copies); put it in targets, or unset "
                "ensure_weight_tying"
            )
        if in_targets:
            return True, []
        return False, [
            "ensure_weight_tying is set, but neither targets nor modules_to_save names an "
            f"embedding layer ({', '.join(EMBEDDING_LAYER_NAMES)})"
        ]
    if (to_save or in_targets) and tied:
        then = (
            "merging changes the tied layer too"
            if in_targets
            else "a merged model has untied embeddings"
        )
        return False, [
            f"the model ties {', '.join(tied)} to its input embedding (tie_word_embeddings) and "
            "the adapter adapts an embedding layer without ensure_weight_tying: the other "
            f"layer keeps the base weight, and {then} (as in PEFT)"
        ]
    return False, []


def with_tied_targets(spec: LoraAdapter, model: nn.Module) -> LoraAdapter:
    """``spec`` with the input embedding among its targets (and names of tied layers
    dropped) when ``ensure_weight_tying`` ties them: PEFT's ``_add_targets_to_tie``."""
    if not spec.ensure_weight_tying or not _tying(spec, model)[0]:
        return spec
    source = input_embedding_path(model)
    assert source is not None  # tied layers are tied to an input embedding
    targets = spec.targets
    if isinstance(targets, RegexTargets):
        pattern = rf"(?:{targets.pattern}|^{re.escape(source)}$)"
        return spec.model_copy(update={"targets": RegexTargets(kind="regex", pattern=pattern)})
    assert isinstance(targets, NameTargets)
    names = list(dict.fromkeys([*targets.names, source]))
    for key in tied_with_input_embedding(model):
        for name in names:
            if re.match(rf"(^|.*\.){name}($|\..*)", key):
                names.remove(name)
                break
    return spec.model_copy(update={"targets": NameTargets(kind="names", names=tuple(names))})


def lora_companions(
    lora: Method, model: nn.Module, spec: LoraAdapter, adapter: str, targets: tuple[str, ...]
) -> Companions:
    """The heads ``ensure_weight_tying`` ties, then the rows of ``trainable_token_indices``."""
    ties, warnings = _tying(spec, model)
    found: list[tuple[Method, str, Settings]] = []
    if ties:
        found.extend(_tied_heads(lora, model, spec, adapter))
    rows, more = _token_rows(model, spec, targets)
    warnings.extend(more)
    tokens = method(TOKENS)
    for row in rows:
        module = model.get_submodule(row.path)
        kind = find_kind(module)
        assert kind is not None  # (_check_token_layer)
        found.append((tokens, row.path, tokens.settings(kind, module, row.path, adapter, row)))
    return Companions(tuple(found), tuple(warnings))


def _tied_heads(
    lora: Method, model: nn.Module, spec: LoraAdapter, adapter: str
) -> list[tuple[Method, str, Settings]]:
    source = input_embedding_path(model)
    assert source is not None
    embedding = model.get_submodule(source)
    kind = find_kind(embedding)
    assert kind is not None
    own = lora.settings(kind, embedding, source, adapter, spec)
    tied = tied_with_input_embedding(model)
    heads: list[tuple[Method, str, Settings]] = []
    for path, module in model.named_modules():  # PEFT's _check_tied_module_exists
        if not path or not (path in tied or any(path.endswith(f".{t}") for t in tied)):
            continue
        head = find_kind(module)
        if head is None or head.name != "nn.Linear":
            raise ValueError(
                f"{path} ({type(module).__name__}) is tied to {source}, but ensure_weight_tying "
                "ties LoRA adapters on nn.Linear layers only (as PEFT)"
            )
        settings = lora.settings(head, module, path, adapter, spec)
        assert isinstance(settings, BranchConfig) and isinstance(own, BranchConfig)
        problem = _tie_problem(settings, own)
        if problem:
            raise ValueError(f"{path}: ensure_weight_tying ties it to {source}, but {problem}")
        heads.append((lora, path, replace(settings, tied_to=source)))
    return heads


def _tie_problem(head: BranchConfig, source: BranchConfig) -> str | None:
    if head.r != source.r:
        return (
            f"their ranks differ ({head.r} and {source.r}, from rank_pattern): tied adapters "
            "share their factors"
        )
    if head.variant is not None:
        return f"a tied adapter cannot be {head.variant} (its factors are the embedding's)"
    if head.lora_bias:
        return "a tied adapter cannot have lora_bias"
    if head.init not in _TIED_INITS:
        return f"a tied adapter needs init default, gaussian or random, not {head.init!r}"
    return None


def _token_rows(
    model: nn.Module, spec: LoraAdapter, lora_targets: tuple[str, ...]
) -> tuple[list[Rows], list[str]]:
    """PEFT's ``set_additional_trainable_modules`` for ``trainable_token_indices``."""
    wanted = spec.trainable_token_indices
    if wanted is None:
        return [], []
    if isinstance(wanted, Mapping):
        layers = {str(k): tuple(v) for k, v in wanted.items()}
    else:
        layers = {str(input_embedding_path(model, "embed_tokens")): tuple(wanted)}
    for name in layers:
        if name in spec.modules_to_save:
            raise ValueError(
                f"{name!r} is both in modules_to_save and trainable_token_indices: train the "
                "embedding in full or some of its rows, not both (as in PEFT)"
            )
    tied_model = ties_word_embeddings(model)
    tied_names = tied_with_input_embedding(model)
    source = input_embedding_path(model)
    mismatch = False
    skip: set[str] = set()
    if len(layers) > 1 and tied_model and source is not None:
        keys = [
            t
            for t in layers
            if source.endswith(t) or any(m.endswith(t) or t in m.split(".") for m in tied_names)
        ]
        if len(keys) >= 2:
            first = layers[keys[0]]
            mismatch = any(layers[k] != first for k in keys[1:])
            if mismatch and spec.ensure_weight_tying:
                listed = ", ".join(f"{k}: {list(layers[k])}" for k in keys)
                raise ValueError(
                    "ensure_weight_tying: the tied layers get different trainable_token_indices "
                    f"({listed}); give them the same indices, or unset ensure_weight_tying"
                )
            if not mismatch:
                skip = set(keys) & set(tied_names)
    found: dict[str, Rows] = {}
    seen: set[int] = set()
    paths = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if p]
    for name, ids in layers.items():
        if name in skip:
            continue
        hits = [(p, m) for p, m in paths if p.endswith(name)]
        if not hits:
            raise ValueError(_not_found(name, [p for p, _ in paths]))
        for path, module in hits:
            _check_token_layer(path, module, f"trainable_token_indices entry {name!r}")
            if id(module) not in seen and path not in found:
                seen.add(id(module))
                found[path] = Rows(path, ids)
    warnings = []
    if not tied_model and spec.ensure_weight_tying:
        warnings.append(
            "ensure_weight_tying is set, but the model does not tie its word embeddings "
            "(tie_word_embeddings is false): its trainable tokens are not tied"
        )
    if tied_model and source in found and (spec.ensure_weight_tying or not mismatch):
        rows = found[source].token_indices
        for path in tied_paths(model, source):
            module = model.get_submodule(path)
            _check_token_layer(path, module, f"the tie to {source}")
            if id(module) not in seen and path not in found:
                seen.add(id(module))
                found[path] = Rows(path, rows, tied_to=source)
    for path in found:
        if path in lora_targets:
            raise ValueError(
                f"{path}: trainable_token_indices cannot be applied to a LoRA target (as in "
                "PEFT): give it either LoRA or trainable tokens"
            )
    return list(found.values()), warnings


def _check_token_layer(path: str, module: nn.Module, why: str) -> None:
    kind = find_kind(module)
    tokens = method(TOKENS)
    if kind is None or not tokens.supports(kind):
        raise ValueError(
            f"{path} ({type(module).__name__}) is selected by {why}, but trainable tokens need "
            f"a layer of type {', '.join(tokens.kinds or ())}"
        )


def _not_found(name: str, paths: list[str]) -> str:
    tails = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], tails, n=3, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"trainable_token_indices: no module of the model ends with {name!r} (PEFT matches a "
        f"plain suffix of the path){hint}"
    )


@torch.no_grad()
def _share(view: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(view)


def tie_lora(branch: Branch, source: Branch, settings: Settings) -> None:
    """PEFT's tied LoRA head: ``lora_A.weight`` becomes a view of the embedding's
    ``lora_embedding_B``ᵀ, ``lora_B.weight`` of its ``lora_embedding_A``ᵀ (new parameters
    over the same storage), then, as PEFT does, the head's factors are initialised as a
    linear layer's, *through the views*: the embedding's factors take that init (``A =
    0``, so a no-op still); ``init: random`` keeps the embedding's draws. (The head's
    branch was built without its own init: :meth:`LoraMethod.make_branch`.)"""
    assert isinstance(branch, LoraBranch) and isinstance(source, EmbeddingBranch)
    assert isinstance(settings, BranchConfig)
    A, B = branch.lora_A.weight, branch.lora_B.weight  # (r, dim), (vocab, r)
    emb_A, emb_B = source.lora_embedding_A, source.lora_embedding_B  # (r, vocab), (dim, r)
    assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
    if tuple(A.shape) != tuple(emb_B.T.shape) or tuple(B.shape) != tuple(emb_A.T.shape):
        raise ValueError(
            f"{branch.target}: its LoRA factors {tuple(A.shape)}, {tuple(B.shape)} cannot be "
            f"tied to {source.target}'s {tuple(emb_A.shape)}, {tuple(emb_B.shape)}"
        )
    branch.lora_A.weight = tied_A = _share(emb_B.T)
    branch.lora_B.weight = tied_B = _share(emb_A.T)
    branch.tied_to = source.target
    if settings.init == "random" or tied_A.device.type == "meta":
        return
    with torch.no_grad():  # PEFT's reset_lora_parameters, on the views (their draws fill
        if settings.init == "gaussian":  # the storage in the order PEFT's do)
            nn.init.normal_(tied_A, std=1 / settings.r)
        else:
            nn.init.kaiming_uniform_(tied_A, a=math.sqrt(5))
        nn.init.zeros_(tied_B)
