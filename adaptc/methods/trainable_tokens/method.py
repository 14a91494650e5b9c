"""Trainable tokens as an adapter method: per-target settings, the branch, its nodes, merge.

It mirrors peft 0.21.2's ``peft/tuners/trainable_tokens`` (``TrainableTokensLayer``): the
rows start as copies of the layer's (or standard normal, in the layer's dtype, with
``init: random``), are float32 on a half-precision layer and are cast to the layer's dtype
where they are read; merging writes them into a new weight (``index_copy``). Unlike PEFT,
the base layer's weight is never rebuilt for a forward: the graph reads the base output
and puts the trained rows in place of the listed tokens' (an embedding's rows by token,
an output head's logits by column), which gives PEFT's values exactly.

The same branch serves LoRA's ``trainable_token_indices`` (``wrapped``: PEFT's
``TrainableTokensWrapper``, whose file keys go under ``token_adapter.``) and an output
head tied to the input embedding (``tied_to``: it holds the embedding branch's very
parameter).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.layers import LayerKind
from adaptc.layers.tying import input_embedding_path, tied_paths
from adaptc.methods.base import Branch, Companions, Method, Settings
from adaptc.methods.trainable_tokens.spec import TrainableTokensAdapter
from adaptc.spec.fields import RegexTargets

__all__ = ["METHOD", "PARAMETER", "TokenSettings", "TrainableTokensBranch"]

PARAMETER = "trainable_tokens_delta"  # PEFT's name (and key suffix in adapter files)
WRAPPED = f"token_adapter.{PARAMETER}"  # under LoRA's trainable_token_indices
_EMBEDDING = "nn.Embedding"


@dataclass(frozen=True)
class TokenSettings(Settings):
    """Trainable rows of one adapter on one target."""

    adapter: str
    target: str
    token_indices: tuple[int, ...]
    init: str = "copy"  # "copy" or "random" (PEFT init_weights True / False)
    wrapped: bool = False  # LoRA's trainable_token_indices (PEFT's TrainableTokensWrapper)
    tied_to: str | None = None  # the input embedding whose rows this output head reads


class TrainableTokensBranch(Branch):
    """The trained rows ``trainable_tokens_delta`` (n, dim) of one adapter on one target,
    with the token ids as a buffer ``token_index`` (n,) and, on an embedding, the row of
    each token id ``token_rows`` (num_embeddings,): its position in the delta, or n for a
    token that is not trained. A tied branch holds the parameter of the branch it
    follows (set by :meth:`TrainableTokensMethod.tie`)."""

    method: ClassVar[str] = "trainable_tokens"

    def __init__(
        self, delta: nn.Parameter | None, settings: TokenSettings, *, rows: int, lookup: bool,
        device: torch.device,
    ) -> None:  # fmt: skip
        super().__init__()
        self.register_parameter(PARAMETER, delta)
        self.adapter = settings.adapter
        self.target = settings.target
        self.token_indices = settings.token_indices
        self.wrapped = settings.wrapped
        self.tied_to = settings.tied_to
        n = len(settings.token_indices)
        index = torch.tensor(settings.token_indices, dtype=torch.long)
        self.register_buffer("token_index", index.to(device), persistent=False)
        table = None
        if lookup:  # embeddings: each token id's row of the delta (n: not trained)
            if device.type == "meta":
                table = torch.empty(rows, dtype=torch.long, device=device)
            else:
                table = torch.full((rows,), n, dtype=torch.long)
                table[index] = torch.arange(n)
                table = table.to(device)
        self.register_buffer("token_rows", table, persistent=False)

    @property
    def delta(self) -> torch.Tensor:
        delta = getattr(self, PARAMETER)
        assert isinstance(delta, torch.Tensor), f"{self.target}: the branch is not tied yet"
        return delta

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """PEFT's keys: ``trainable_tokens_delta`` (also under a tied head, which PEFT's
        ``TrainableTokensLayer`` shares), ``token_adapter.trainable_tokens_delta`` for
        LoRA's trainable tokens (whose tied heads PEFT does not save)."""
        if self.wrapped and self.tied_to is not None:
            return
        yield (WRAPPED if self.wrapped else PARAMETER), self.delta

    def extra_repr(self) -> str:
        tied = f", tied to {self.tied_to}" if self.tied_to is not None else ""
        return f"adapter={self.adapter!r}, tokens={len(self.token_indices)}{tied}"


def _tokens(settings: Settings) -> TokenSettings:
    assert isinstance(settings, TokenSettings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> TrainableTokensBranch:
    assert isinstance(branch, TrainableTokensBranch), type(branch).__name__
    return branch


def rows_of(kind: LayerKind, module: nn.Module) -> int:
    """The number of rows a token index selects: an embedding's tokens, a head's outputs."""
    return int(kind.weight(module).shape[0])


class TrainableTokensMethod(Method):
    """Rows ``idx`` of the layer's weight replaced by trained ones: ``W[idx] := Δ``."""

    name = "trainable_tokens"
    title = "trainable tokens"
    prefix = "trainable_tokens_"
    branch_type = TrainableTokensBranch
    # PEFT's TrainableTokensLayer: embeddings, and linear layers (an output head)
    kinds = (_EMBEDDING, "nn.Linear")

    # --- plan ---------------------------------------------------------------------------
    def with_model(self, spec: Any, model: nn.Module) -> Any:
        """Omitted targets: the input embedding's path (PEFT's
        ``_get_input_embeddings_name``), else a top-level ``embed_tokens``."""
        assert isinstance(spec, TrainableTokensAdapter)
        if spec.targets is not None:
            return spec
        path = input_embedding_path(model)
        pattern = "embed_tokens" if path is None else re.escape(path)
        return spec.model_copy(update={"targets": RegexTargets(kind="regex", pattern=pattern)})

    def companions(
        self, model: nn.Module, spec: Any, adapter: str, targets: tuple[str, ...]
    ) -> Companions:
        """PEFT's ``TrainableTokensModel``: with ``tie_word_embeddings``, the layers tied to
        a targeted input embedding read its rows (a tied head targeted too is replaced)."""
        assert isinstance(spec, TrainableTokensAdapter)
        source = input_embedding_path(model)
        if source is None or source not in targets:
            return Companions()
        found = []
        for path in tied_paths(model, source):
            settings = TokenSettings(
                adapter, path, spec.token_indices, spec.init, wrapped=False, tied_to=source
            )
            found.append((self, path, settings))
        return Companions(tuple(found))

    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> TokenSettings:
        """From the adapter's spec model, or from another method's description of rows it
        trains beside its own adapter (LoRA's ``trainable_token_indices``): any object with
        ``token_indices`` and optionally ``init``, ``wrapped`` and ``tied_to``."""
        return TokenSettings(
            adapter,
            path,
            tuple(spec.token_indices),
            getattr(spec, "init", "copy"),
            wrapped=bool(getattr(spec, "wrapped", False)),
            tied_to=getattr(spec, "tied_to", None),
        )

    def check(self, kind: LayerKind, module: nn.Module, settings: Settings) -> list[str]:
        s = _tokens(settings)
        self.check_supported(kind, s.target)
        rows = rows_of(kind, module)
        bad = [i for i in s.token_indices if i >= rows]
        if bad:
            what = "tokens" if kind.name == _EMBEDDING else "output features"
            raise ValueError(
                f"{s.target}: token index {bad[0]} is out of range: the layer has {rows} "
                f"{what} (indices 0 to {rows - 1})"
            )
        if getattr(module, "max_norm", None) is not None:
            raise ValueError(
                f"{s.target}: trainable tokens on an embedding with max_norm are not supported "
                "by adaptc (the lookup would renormalise the trained rows in place)"
            )
        return []

    def columns(self) -> tuple[str, ...]:
        return ("tokens",)

    def row(self, settings: Settings) -> tuple[str, ...]:
        s = _tokens(settings)
        tied = f" (tied to {s.tied_to})" if s.tied_to is not None else ""
        return (f"{len(s.token_indices)}{tied}",)

    def plan_fields(self, settings: Settings) -> dict[str, Any]:
        s = _tokens(settings)
        return {
            "token_indices": list(s.token_indices),
            "init": s.init,
            "wrapped": s.wrapped,
            "tied_to": s.tied_to,
        }

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[TrainableTokensBranch, dict[str, torch.Tensor]]:
        s = _tokens(settings)
        self.check_supported(kind, s.target)
        weight = kind.weight(module)
        rows = rows_of(kind, module)
        delta: nn.Parameter | None = None
        if s.tied_to is None:  # a tied branch gets its source's parameter (tie)
            shape = (len(s.token_indices), int(weight.shape[1]))
            dtype = _adapter_dtype(weight.dtype)
            if weight.device.type == "meta":
                data = torch.empty(shape, dtype=dtype, device="meta")
            elif s.init == "copy":
                index = torch.tensor(s.token_indices, device=weight.device)
                data = weight.detach()[index].to(dtype)  # (a copy: never the base's storage)
            else:  # PEFT's draw: in the layer's dtype, on its device
                data = torch.randn(shape, dtype=weight.dtype, device=weight.device).to(dtype)
            delta = nn.Parameter(data.clone())
        lookup = kind.name == _EMBEDDING
        branch = TrainableTokensBranch(delta, s, rows=rows, lookup=lookup, device=weight.device)
        return branch, {}

    def tie(self, branch: Branch, source: Branch, settings: Settings) -> None:
        """The tied branch holds ``source``'s parameter (one tensor: trained, counted and
        saved once), as PEFT's tied ``TrainableTokensLayer`` does."""
        b, src = _branch(branch), _branch(source)
        if b.token_indices != src.token_indices:
            raise ValueError(
                f"{b.target}: tied to {src.target}, whose token indices differ"
            )  # (the plan ties same indices only)
        setattr(b, PARAMETER, src.delta)

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
        """Put the trained rows in place of the listed tokens' in the layer's output.

        Before (an embedding)::

            def forward(self, input):
                base_layer = self.base_layer(input);  input = None
                return base_layer

        After (``trainable_tokens_delta``: (n, dim); ``token_rows``: each token's row, n
        when it is not trained)::

            def forward(self, input):
                base_layer = self.base_layer(input)
                delta = self.base_layer.trainable_tokens_default.trainable_tokens_delta
                pad = torch.nn.functional.pad(delta, (0, 0, 0, 1));  delta = None
                rows = self.base_layer.trainable_tokens_default.token_rows
                getitem = rows[input];  rows = input = None
                embedding = torch.nn.functional.embedding(getitem, pad, ...);  pad = None
                lt = getitem < 3;  getitem = None
                unsqueeze = lt.unsqueeze(-1);  lt = None
                where = torch.where(unsqueeze, embedding, base_layer)
                return where

        On a linear layer (a tied output head), the columns of the listed tokens::

            linear = torch._C._nn.linear(input, delta)   # (…, n)
            index_copy = base_layer.index_copy(-1, token_index, linear)

        A half-precision layer reads the float32 rows cast to its dtype (``.to``), as PEFT
        does; an embedding's ``embed_scale`` scales them as it scales the base rows.
        """
        b = _branch(branch)
        compute = kind.compute_dtype(base)
        n = len(b.token_indices)
        with graph.inserting_before(current.next):
            delta = graph.get_attr(f"{branch_path}.{PARAMETER}")
            if b.delta.dtype != compute:
                delta = graph.call_method("to", (delta, compute))
            if kind.name != _EMBEDDING:
                index = graph.get_attr(f"{branch_path}.token_index")
                bias = None
                if getattr(base, "bias", None) is not None:
                    own = graph.get_attr(f"{call.target}.bias")
                    bias = graph.call_function(torch.index_select, (own, 0, index))
                cols = graph.call_function(F.linear, (x, delta, bias))  # (…, n)
                return graph.call_method("index_copy", (current, -1, index, cols))
            padded = graph.call_function(F.pad, (delta, (0, 0, 0, 1)))  # (n + 1, dim)
            table = graph.get_attr(f"{branch_path}.token_rows")
            rows = graph.call_function(operator.getitem, (table, x))  # (…,)
            padding = getattr(base, "padding_idx", None)
            kwargs: dict[str, Any] = {
                "padding_idx": b.token_indices.index(padding)
                if padding in b.token_indices
                else None,
                "scale_grad_by_freq": bool(getattr(base, "scale_grad_by_freq", False)),
            }
            trained = graph.call_function(F.embedding, (rows, padded), kwargs)  # (…, dim)
            scale = _embed_scale(graph, base, str(call.target), compute)
            if scale is not None:
                trained = graph.call_function(operator.mul, (trained, scale))
            hit = graph.call_function(operator.lt, (rows, n))
            hit = graph.call_method("unsqueeze", (hit, -1))
            return graph.call_function(torch.where, (hit, trained, current))

    # --- merge --------------------------------------------------------------------------
    def merge(
        self,
        kind: LayerKind,
        module: nn.Module,
        branch: Branch,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PEFT's merge: the rows written into a new weight (``index_copy``)."""
        b = _branch(branch)
        index = torch.tensor(b.token_indices, dtype=torch.long, device=weight.device)
        return weight.index_copy(0, index, b.delta.detach().to(weight)), bias


def _embed_scale(
    graph: fx.Graph, base: nn.Module, base_path: str, dtype: torch.dtype
) -> fx.Node | float | None:
    """The scalar ``embed_scale`` of an embedding (Gemma 3's scaled embeddings) as a graph
    value in ``dtype``, or None: PEFT's ``_get_embed_scale`` (a Python number in the
    weight's dtype first; a tensor of more than one element is ignored)."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        return float(torch.tensor(scale, dtype=weight.dtype).item())
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        node = graph.get_attr(f"{base_path}.embed_scale")
        return graph.call_method("to", (node, dtype))
    return None


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The rows' dtype: float32 for a half-precision (or smaller) layer, as PEFT's
    ``autocast_adapter_dtype`` casts them."""
    if dtype.is_floating_point and dtype.itemsize < 4:
        return torch.float32
    return dtype


METHOD = TrainableTokensMethod()
