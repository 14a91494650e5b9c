"""Prompt tuning as an adapter method: its one target, the branch, the input rewrite.

It mirrors peft 0.21.2's ``PromptEmbedding`` and the prompt-learning paths of
``PeftModelForCausalLM.forward`` / ``prepare_inputs_for_generation``. The method's one
target is the model's input embedding: the branch under it holds the virtual tokens
(``embedding``, an ``nn.Embedding`` of ``num_virtual_tokens`` rows, float32 as PEFT's), and
the embedding's graph is left as it is (the embedding also embeds decoder inputs and
generated tokens, which get no prompt). The prompt goes in where PEFT puts it, at the
model's entry: :meth:`PromptTuningMethod.finish` registers a forward pre-hook on the new
root which, when a sequence starts (no cache, or an empty one),

- embeds ``input_ids`` with the (compiled) input embedding and puts the virtual tokens in
  front: ``inputs_embeds`` (B, n + T, d), ``input_ids`` None;
- extends ``attention_mask`` with n ones in front, ``labels`` with n times -100;

and on every call drops ``position_ids`` and ``token_type_ids`` (with PEFT's warnings) and
``cache_position`` (the model counts from its cache, which holds the virtual tokens). A
decoding step (a cache that is not empty) only gets the longer attention mask. The hook
works while the adapter is active and adapters are not disabled. Merging is refused.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from adaptc.layers import LayerKind
from adaptc.layers.tying import input_embedding_path
from adaptc.methods.base import Branch, Method, Settings
from adaptc.methods.prompt_tuning.spec import PromptTuningAdapter
from adaptc.spec.fields import RegexTargets

__all__ = ["FILE_KEY", "METHOD", "PromptBranch", "PromptSettings"]

FILE_KEY = "prompt_embeddings"  # PEFT's key in adapter_model.safetensors
_EMBEDDING = "nn.Embedding"
_IGNORED = {  # PEFT's warnings, word for word
    "position_ids": "Position ids are not supported for parameter efficient tuning. Ignoring "
    "position ids.",
    "token_type_ids": "Token type ids are not supported for parameter efficient tuning. "
    "Ignoring token type ids",
}
_STATE = "_adaptc"  # the compiled root's state (adaptc.compiler.state.STATE, a layer above)


@dataclass(frozen=True)
class PromptSettings(Settings):
    """The virtual tokens of one adapter, on the input embedding."""

    adapter: str
    target: str
    num_virtual_tokens: int
    token_dim: int | None = None
    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    tokenizer_kwargs: tuple[tuple[str, Any], ...] = ()
    tied_to: str | None = None


class PromptBranch(Branch):
    """The virtual tokens ``embedding.weight`` (n, d) of one adapter (PEFT's
    ``prompt_encoder.<adapter>.embedding``), a child of the input embedding."""

    method: ClassVar[str] = "prompt_tuning"

    def __init__(self, embedding: nn.Embedding, settings: PromptSettings) -> None:
        super().__init__()
        self.embedding = embedding
        self.adapter = settings.adapter
        self.target = settings.target
        self.num_virtual_tokens = settings.num_virtual_tokens

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    def model_file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield FILE_KEY, self.embedding.weight

    def prompts(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The virtual tokens for a batch: (B, n, d) in ``dtype``."""
        weight = self.embedding.weight
        return weight.unsqueeze(0).expand(batch, -1, -1).to(dtype)


def _settings(settings: Settings) -> PromptSettings:
    assert isinstance(settings, PromptSettings), type(settings).__name__
    return settings


class PromptTuningMethod(Method):
    name: ClassVar[str] = "prompt_tuning"
    prefix: ClassVar[str] = "prompt_encoder_"
    branch_type: ClassVar[type[Branch]] = PromptBranch
    kinds: ClassVar[tuple[str, ...] | None] = (_EMBEDDING,)
    title: ClassVar[str] = "prompt tuning"

    # --- plan ---------------------------------------------------------------------------
    def with_model(self, spec: Any, model: nn.Module) -> Any:
        """Omitted targets: the model's input embedding (``get_input_embeddings()``).
        Encoder-decoder models are refused (PEFT's seq2seq prompt tuning is not
        implemented)."""
        assert isinstance(spec, PromptTuningAdapter)
        config: Any = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False) or spec.num_transformer_submodules == 2:
            raise ValueError(
                "prompt tuning of encoder-decoder models (num_transformer_submodules 2) is "
                "not supported by adaptc yet"
            )
        if spec.targets is not None:
            return spec
        path = input_embedding_path(model)
        if path is None:
            raise ValueError(
                "prompt tuning needs the model's input embedding (get_input_embeddings()), "
                "and this model has none: name it in targets"
            )
        return spec.model_copy(
            update={"targets": RegexTargets(kind="regex", pattern=re.escape(path))}
        )

    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> PromptSettings:
        assert isinstance(spec, PromptTuningAdapter)
        return PromptSettings(
            adapter,
            path,
            spec.num_virtual_tokens,
            spec.token_dim,
            spec.init,
            spec.init_text,
            spec.tokenizer,
            tuple(sorted((spec.tokenizer_kwargs or {}).items())),
        )

    def check(self, kind: LayerKind, module: nn.Module, settings: Settings) -> list[str]:
        s = _settings(settings)
        self.check_supported(kind, s.target)
        dim = int(kind.weight(module).shape[1])
        if s.token_dim is not None and s.token_dim != dim:
            raise ValueError(
                f"{s.target}: token_dim {s.token_dim} differs from the input embedding's "
                f"dimension {dim}"
            )
        return []

    def columns(self) -> tuple[str, ...]:
        return ("virtual tokens",)

    def row(self, settings: Settings) -> tuple[str, ...]:
        return (str(_settings(settings).num_virtual_tokens),)

    def plan_fields(self, settings: Settings) -> dict[str, Any]:
        s = _settings(settings)
        return {"num_virtual_tokens": s.num_virtual_tokens, "init": s.init}

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[PromptBranch, dict[str, torch.Tensor]]:
        """PEFT's ``PromptEmbedding``: an ``nn.Embedding`` (standard normal, float32), whose
        rows are then, with ``init`` text or sample_vocab, the embeddings of tokens."""
        s = _settings(settings)
        self.check_supported(kind, s.target)
        weight = kind.weight(module)
        n, dim = s.num_virtual_tokens, int(weight.shape[1])
        if weight.device.type == "meta":
            embedding = nn.Embedding(n, dim, device="meta")
            return PromptBranch(embedding, s), {}
        embedding = nn.Embedding(n, dim).to(weight.device)  # PEFT's draw (CPU, then moved)
        ids: torch.Tensor | None = None
        if s.init == "sample_vocab":
            ids = torch.randint(0, int(weight.shape[0]), (n,), dtype=torch.long)
        elif s.init == "text":
            ids = torch.tensor(_text_token_ids(s, n), dtype=torch.long)
        if ids is not None:
            with torch.no_grad():
                rows = module(ids.to(weight.device)).detach().clone().to(torch.float32)
            embedding.weight = nn.Parameter(rows)
        return PromptBranch(embedding, s), {}

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
        """Nothing: the embedding's output stays the base's (the prompt is put in front of
        the embedded input by the root's pre-hook, see the module docstring)."""
        return current

    def finish(self, model: nn.Module, adapter: str, spec: Any) -> None:
        """Register the input rewrite on the new root (see the module docstring)."""
        model.register_forward_pre_hook(
            _PromptHook(adapter, self.child_name(adapter)), with_kwargs=True
        )

    # --- merge --------------------------------------------------------------------------
    def merge(
        self,
        kind: LayerKind,
        module: nn.Module,
        branch: Branch,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise ValueError(
            f"adapter {branch.adapter!r}: prompt tuning cannot be merged: its virtual tokens "
            "are extra inputs, not a change of the model's weights"
        )


def _text_token_ids(s: PromptSettings, n: int) -> list[int]:
    """PEFT's TEXT init: ``init_text``'s token ids, cut or repeated to ``n``."""
    from transformers import AutoTokenizer  # (lazy: only this init needs a tokenizer)

    kwargs = dict(s.tokenizer_kwargs)
    kwargs.pop("trust_remote_code", None)  # as PEFT: no code from a checkpoint
    tokenizer = AutoTokenizer.from_pretrained(s.tokenizer, **kwargs)
    ids = list(tokenizer(s.init_text)["input_ids"])
    if not ids:
        raise ValueError(f"{s.target}: init_text {s.init_text!r} has no tokens")
    ids = ids * math.ceil(n / len(ids))
    return [int(i) for i in ids[:n]]


class _PromptHook:
    """The root's forward pre-hook of one adapter: the virtual tokens in front of the input.

    It finds its branch through the module it is called on (so a copy of the model uses
    its own), under that model's input embedding."""

    def __init__(self, adapter: str, child: str) -> None:
        self.adapter = adapter
        self.child = child

    def branch(self, model: nn.Module) -> PromptBranch:
        embedding = _input_embedding(model)
        for module in embedding.modules():
            if isinstance(module, PromptBranch) and module.adapter == self.adapter:
                return module
        raise ValueError(f"prompt tuning adapter {self.adapter!r}: its virtual tokens are gone")

    def __call__(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        state = model.__dict__.get(_STATE)
        if state is None or getattr(state, "disabled", False):
            return None
        if self.adapter not in getattr(state, "active", ()):
            return None
        kwargs = {**_as_keywords(model, args), **kwargs}
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        if source is None:
            return None
        branch = self.branch(model)
        batch, n = int(source.shape[0]), branch.num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    "prompt tuning takes a 2-D attention_mask (batch, tokens), not a "
                    f"{getattr(mask, 'dim', lambda: '?')()}-D one"
                )
            ones = torch.ones(batch, n, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat((ones, mask), dim=1)
        for key in ("position_ids", "token_type_ids"):
            if kwargs.get(key) is not None:
                warnings.warn(_IGNORED[key], UserWarning, stacklevel=2)
                kwargs[key] = None
        kwargs.pop("cache_position", None)
        cache = kwargs.get("past_key_values")
        if cache is not None and _cache_length(cache) > 0:
            return (), kwargs  # a decoding step: the cache holds the virtual tokens
        if embeds is None:
            embeds = _input_embedding(model)(ids)  # (B, T, d)
        prompts = branch.prompts(batch, embeds.dtype)  # (B, n, d)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)  # (B, n + T, d)
        kwargs["input_ids"] = None
        labels = kwargs.get("labels")
        if labels is not None:
            prefix = torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat((prefix, labels), dim=1)
        return (), kwargs


def _input_embedding(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Module):
        raise ValueError("prompt tuning: the model has no input embedding")
    return embedding


def _as_keywords(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    """Positional arguments of the root's ``forward`` by their names."""
    if not args:
        return {}
    names = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise ValueError("prompt tuning: too many positional arguments for the model's forward")
    return dict(zip(names, args, strict=False))


def _cache_length(cache: Any) -> int:
    """The number of positions a cache holds (a transformers ``Cache`` or legacy tuples)."""
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length())
    if isinstance(cache, (tuple, list)) and cache and cache[0]:
        return int(cache[0][0].shape[-2])
    return 0


METHOD = PromptTuningMethod()
