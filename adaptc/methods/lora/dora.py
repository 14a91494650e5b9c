"""DoRA: weight-decomposed LoRA, for linear layers, ``Conv1D``, convolutions and embeddings.

The adapted weight is ``W' = m · (W + s·ΔW) / ‖W + s·ΔW‖`` with the learned magnitude ``m``
(one entry per output feature, PEFT's ``lora_magnitude_vector``: the key in adapter files
has no ``.weight`` suffix, so it is a bare parameter of the branch). The norm is taken per
output feature and detached from the graph (DoRA paper, §4.3). As PEFT computes it, the
forward of a linear layer or convolution is::

    y = base_out + (m/‖W + s·ΔW‖ − 1) · (base_out − b) + m/‖W + s·ΔW‖ · s · B(A(x))

where ``base_out`` is the base layer's output (with the previous adapters' updates, when
several are stacked) and ``b`` the base bias. With dropout in training mode PEFT instead
drops ``x`` for both terms: ``(base_out − b)`` becomes ``W·dropout(x)`` and ``B(A(x))``
becomes ``B(A(dropout(x)))``. For an embedding, with no dropout and no bias::

    y = m/‖W + s·ΔW‖ · base_out + m/‖W + s·ΔW‖ · s · embed(x, Aᵀ)·Bᵀ  [· embed_scale]

The branch is one ``call_module`` node that receives ``x``, ``base_out`` and the base
weight (and bias or ``embed_scale``) as ``get_attr`` nodes, and returns the layer's output.
PEFT quirks kept: a linear branch computes ``B·A`` as ``lora_B(lora_A(I))ᵀ``; a
convolution's ``B·A`` is ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the kernel (which
mixes groups when ``groups > 1``) and its magnitude has shape (1, out, 1, …).
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.layers import dequantized_weight
from adaptc.methods.lora import variants
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.conv import CONV_FN, make_conv_branch
from adaptc.methods.lora.embedding import (
    EmbeddingBranch,
    emit_embed_scale,
    make_embedding_branch,
)
from adaptc.methods.lora.linear import make_linear_branch, transpose
from adaptc.methods.lora.rule import BranchConfig, LoraRule, Merged

__all__ = [
    "DoraConv",
    "DoraConvBranch",
    "DoraEmbedding",
    "DoraEmbeddingBranch",
    "DoraLinear",
    "DoraLinearBranch",
    "conv_weight_norm",
    "linear_weight_norm",
]

NAME = "dora"


def linear_weight_norm(
    weight: torch.Tensor,
    lora_weight: torch.Tensor,
    scaling: float | torch.Tensor,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """``‖W + s·ΔW‖`` per output feature: (out,). ``lora_weight`` is (out, in)."""
    w = transpose(weight, fan_in_fan_out) + scaling * lora_weight  # (out, in)
    norm: torch.Tensor = torch.linalg.norm(w, dim=1)
    return norm.to(w.dtype)


def conv_weight_norm(
    weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float | torch.Tensor
) -> torch.Tensor:
    """``‖W + s·ΔW‖`` per output channel, shaped (1, out, 1, …) as PEFT keeps it."""
    w = weight + scaling * lora_weight  # (out, in/groups, *k)
    norm: torch.Tensor = w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True)
    return norm.transpose(1, 0)


def conv_lora_weight(A: torch.Tensor, B: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """PEFT's ``B·A`` for a convolution: ``B.view(-1, r) @ A.view(r, -1)``, reshaped."""
    r = A.shape[0]
    return torch.mm(B.view([-1, r]), A.view([r, -1])).reshape(shape)


def _missing(target: str) -> ValueError:
    return ValueError(f"{target}: a DoRA branch is called with the base output and weight")


class DoraLinearBranch(LoraBranch):
    """DoRA on ``nn.Linear``/``Conv1D``; ``forward`` returns the layer's full output."""

    variant = NAME

    def __init__(self, plain: LoraBranch, magnitude: torch.Tensor) -> None:
        super().__init__(plain.lora_A, plain.lora_B, **_settings(plain))
        self.lora_magnitude_vector = nn.Parameter(magnitude)  # (out,)

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if base_out is None or weight is None:
            raise _missing(self.target)
        base_result: torch.Tensor | None = base_out
        if self.lora_dropout is not None and self.training:
            x = self.lora_dropout(x)
            base_result = None
        A = self.lora_A.weight
        assert isinstance(A, torch.Tensor)
        eye = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
        lora_weight = self.lora_B(self.lora_A(eye)).T.to(x.dtype)  # (out, in), with B's bias
        weight = weight.to(x.dtype)
        norm = linear_weight_norm(
            weight, lora_weight.detach(), self.scaling_operand, self.fan_in_fan_out
        )
        mag_norm_scale = (self.lora_magnitude_vector / norm.detach()).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        if base_result is None:
            base_result = F.linear(x, transpose(weight, self.fan_in_fan_out))
        elif bias is not None:
            base_result = base_result - bias
        dora: torch.Tensor = (mag_norm_scale - 1) * base_result
        dora = dora + mag_norm_scale * lora_result * self.scaling_operand
        return base_out + dora


class DoraConvBranch(LoraBranch):
    """DoRA on ``nn.Conv1d/2d/3d``; ``forward`` returns the layer's full output."""

    variant = NAME

    def __init__(
        self, plain: LoraBranch, magnitude: torch.Tensor, conv: nn.modules.conv._ConvNd
    ) -> None:
        super().__init__(plain.lora_A, plain.lora_B, **_settings(plain))
        self.lora_magnitude_vector = nn.Parameter(magnitude)  # (1, out, 1, …)
        # the base convolution's geometry, for the base term under dropout
        self.dims = conv.weight.dim() - 2
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if base_out is None or weight is None:
            raise _missing(self.target)
        base_result: torch.Tensor | None = base_out
        if self.lora_dropout is not None and self.training:
            x = self.lora_dropout(x)
            base_result = None
        A, B = self.lora_A.weight, self.lora_B.weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        lora_weight = conv_lora_weight(A, B, weight.shape)
        norm = conv_weight_norm(weight, lora_weight.detach(), self.scaling_operand)
        mag_norm_scale = self.lora_magnitude_vector / norm.detach()  # (1, out, 1, …)
        if base_result is None:
            # PEFT passes the base weight as is, which fails on a half-precision base; cast it
            base_result = CONV_FN[self.dims](
                x, weight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups
            )
        elif bias is not None:
            base_result = base_result - bias.view((1, -1) + (1,) * (base_result.dim() - 2))
        lora_result = self.lora_B(self.lora_A(x))
        dora: torch.Tensor = (mag_norm_scale - 1) * base_result
        dora = dora + mag_norm_scale * lora_result * self.scaling_operand
        return base_out + dora


class DoraEmbeddingBranch(EmbeddingBranch):
    """DoRA on ``nn.Embedding``; ``forward`` returns the layer's full output."""

    variant = NAME

    def __init__(self, plain: EmbeddingBranch, magnitude: torch.Tensor) -> None:
        super().__init__(
            plain.lora_embedding_A.detach(),
            plain.lora_embedding_B.detach(),
            scaling=plain.scaling,
            adapter=plain.adapter,
            target=plain.target,
            r=plain.r,
            lora_alpha=plain.lora_alpha,
            padding_idx=plain.padding_idx,
            max_norm=plain.max_norm,
            norm_type=plain.norm_type,
            scale_grad_by_freq=plain.scale_grad_by_freq,
            sparse=plain.sparse,
        )
        self.lora_magnitude_vector = nn.Parameter(magnitude)  # (embedding_dim,)

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        embed_scale: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        if base_out is None or weight is None:
            raise _missing(self.target)
        B = self.lora_embedding_B.T  # (r, embedding_dim)
        lora_weight = (self.lora_embedding_A.T @ B).T  # (embedding_dim, num_embeddings)
        norm = linear_weight_norm(weight, lora_weight.detach(), self.scaling_operand, True)
        mag_norm_scale = self.lora_magnitude_vector / norm.detach()  # (embedding_dim,)
        dora = mag_norm_scale * (self.embed(x) @ B) * self.scaling_operand
        if embed_scale is not None:
            dora = dora * embed_scale
        return mag_norm_scale * base_out + dora


class _Settings(TypedDict):
    scaling: float
    dropout: float
    adapter: str
    target: str
    r: int
    lora_alpha: float
    lora_bias: bool
    fan_in_fan_out: bool


def _settings(plain: LoraBranch) -> _Settings:
    """The keyword arguments ``plain`` was built with."""
    return {
        "scaling": plain.scaling,
        "dropout": plain.lora_dropout.p if plain.lora_dropout is not None else 0.0,
        "adapter": plain.adapter,
        "target": plain.target,
        "r": plain.r,
        "lora_alpha": plain.lora_alpha,
        "lora_bias": plain.lora_bias,
        "fan_in_fan_out": plain.fan_in_fan_out,
    }


def _magnitude(m: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The initial magnitude in the adapter dtype (empty on the meta device)."""
    if m is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    return m.to(like.dtype).reshape(shape)


def _emit(
    graph: fx.Graph,
    x: fx.Node,
    base_out: fx.Node,
    *,
    base: nn.Module,
    base_path: str,
    branch: LoraBranch,
    branch_path: str,
    out_dtype: torch.dtype | None,
    quantized: bool = False,
) -> fx.Node:
    """One node calls the branch with the base output and weight; it returns the full output
    (cast to ``out_dtype``, the layer's compute dtype, when the adapter's differs).

    A quantized layer (bitsandbytes: PEFT's ``lora.bnb`` layers with ``use_dora``) gives
    its weight dequantized anew at each forward and dropped after it
    (``dequantized_weight(self.fc)``, PEFT's ``dequantize_module_weight``: nothing
    dequantized stays resident); its ``out_dtype`` is None, its result's dtype following
    its input at run time, so ``x`` is always cast to the adapter's dtype and the output
    back to the base result's (``type_as``), as for plain LoRA on these layers.

    Before::

        def forward(self, x):
            fc = self.fc(x);  x = None
            return fc

    After (DoRA, the base layer has a bias; an embedding passes ``embed_scale`` or None)::

        def forward(self, x):
            fc = self.fc(x)
            fc_weight = self.fc.weight
            fc_bias = self.fc.bias
            fc_lora_default = self.fc.lora_default(x, fc, fc_weight, fc_bias);  x = fc = ...
            return fc_lora_default
    """
    magnitude = branch.lora_magnitude_vector
    assert isinstance(magnitude, torch.Tensor)
    cast = out_dtype != magnitude.dtype  # always at run time (out_dtype None)
    with graph.inserting_before(base_out.next):
        if quantized:
            w = graph.call_function(dequantized_weight, (graph.get_attr(base_path),))
        else:
            w = graph.get_attr(f"{base_path}.weight")
        h = x
        extra: fx.Node | float | None
        if isinstance(branch, DoraEmbeddingBranch):
            extra = emit_embed_scale(graph, base, base_path, magnitude.dtype)
        else:
            if cast:
                h = graph.call_method("to", (h, magnitude.dtype))
            has_bias = getattr(base, "bias", None) is not None
            extra = graph.get_attr(f"{base_path}.bias") if has_bias else None
        out = graph.call_module(branch_path, (h, base_out, w, extra))
        if out_dtype is None:
            out = graph.call_method("type_as", (out, base_out))
        elif cast:
            out = graph.call_method("to", (out, out_dtype))
    return out


def _check_bias(cfg: BranchConfig) -> None:
    if cfg.lora_bias:
        raise ValueError(f"{cfg.target}: lora_bias cannot be combined with DoRA (nor in PEFT)")


class _Dora(variants.Variant):
    title = "DoRA"

    def emit(
        self,
        rule: LoraRule,
        graph: fx.Graph,
        x: fx.Node,
        base_out: fx.Node,
        *,
        base: nn.Module,
        base_path: str,
        branch: LoraBranch,
        branch_path: str,
    ) -> fx.Node:
        return _emit(
            graph, x, base_out, base=base, base_path=base_path, branch=branch,
            branch_path=branch_path, out_dtype=rule.out_dtype(base),
            quantized=rule.kind.quantized,
        )  # fmt: skip


class DoraLinear(_Dora):
    """DoRA on ``nn.Linear`` and ``Conv1D``: ``m = ‖W + s·B·A‖`` per output feature.

    ``W`` is the residual base weight under PiSSA/OLoRA, as in PEFT (which initialises the
    magnitude after the base weight was replaced). On the meta device ``m`` is left empty.
    """

    @torch.no_grad()
    def make_branch(
        self, rule: LoraRule, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        _check_bias(cfg)
        weight = rule.kind.weight(module)  # dequantized, for a quantized kind
        plain, replaced = make_linear_branch(rule, module, cfg)
        A, B = plain.factors()
        base = replaced.get("weight", weight)
        m = (
            None
            if _meta(weight)
            else linear_weight_norm(base, B @ A, cfg.scaling, plain.fan_in_fan_out)
        )
        return DoraLinearBranch(plain, _magnitude(m, (B.shape[0],), A)), replaced

    @torch.no_grad()
    def merge(
        self, rule: LoraRule, module: nn.Module, branch: LoraBranch, weight: torch.Tensor
    ) -> Merged:
        """``m / ‖W₀ + s·ΔW‖ · (weight + s·ΔW)``, the norm from the unmerged weight ``W₀``.

        ``weight`` may already hold other merged adapters, as in PEFT's ``merge``; the
        bias is unchanged (DoRA cannot carry ``lora_bias``)."""
        delta, base, m = _merge_inputs(rule, module, branch)
        transposed = branch.fan_in_fan_out
        norm = linear_weight_norm(base, transpose(delta, transposed), 1, transposed)
        factor = transpose((m / norm).view(-1, 1), transposed)
        return Merged((factor * (weight + delta)).to(weight.dtype))


class DoraConv(_Dora):
    """DoRA on ``nn.Conv1d/2d/3d``: the magnitude has shape (1, out, 1, …)."""

    @torch.no_grad()
    def make_branch(
        self, rule: LoraRule, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        _check_bias(cfg)
        assert isinstance(module, nn.modules.conv._ConvNd)
        weight = module.weight
        plain = make_conv_branch(module, cfg)
        A, B = plain.factors()
        lora_weight = conv_lora_weight(A, B, weight.shape)
        m = None if _meta(weight) else conv_weight_norm(weight, lora_weight, cfg.scaling)
        shape = (1, module.out_channels) + (1,) * (weight.dim() - 2)
        return DoraConvBranch(plain, _magnitude(m, shape, A), module), {}

    @torch.no_grad()
    def merge(
        self, rule: LoraRule, module: nn.Module, branch: LoraBranch, weight: torch.Tensor
    ) -> Merged:
        delta, base, m = _merge_inputs(rule, module, branch)
        factor = (m / conv_weight_norm(base, delta, 1)).view((-1,) + (1,) * (base.dim() - 1))
        return Merged((factor * (weight + delta)).to(weight.dtype))


class DoraEmbedding(_Dora):
    """DoRA on ``nn.Embedding``: one magnitude per embedding dimension."""

    @torch.no_grad()
    def make_branch(
        self, rule: LoraRule, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        _check_bias(cfg)
        assert isinstance(module, nn.Embedding)
        weight = module.weight
        emb = make_embedding_branch(module, cfg)
        eA, eB = emb.lora_embedding_A, emb.lora_embedding_B  # (r, num), (dim, r)
        m = None if _meta(weight) else linear_weight_norm(weight, eB @ eA, cfg.scaling, True)
        return DoraEmbeddingBranch(emb, _magnitude(m, (module.embedding_dim,), eA)), {}

    @torch.no_grad()
    def merge(
        self, rule: LoraRule, module: nn.Module, branch: LoraBranch, weight: torch.Tensor
    ) -> Merged:
        delta, base, m = _merge_inputs(rule, module, branch)
        factor = (m / linear_weight_norm(base, delta.T, 1, True)).view(1, -1)
        return Merged((factor * (weight + delta)).to(weight.dtype))


def _meta(weight: torch.Tensor) -> bool:
    return weight.device.type == "meta"


def _merge_inputs(
    rule: LoraRule, module: nn.Module, branch: LoraBranch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s·ΔW in the base weight's layout, the layer's unmerged weight, the magnitude)."""
    delta = rule.delta_weight(module, branch)
    base = rule.kind.weight(module)  # the unmerged weight, as the kind reads it
    m = branch.lora_magnitude_vector
    assert isinstance(m, torch.Tensor)
    return delta, base, m


variants.register(
    NAME, ("nn.Linear", "transformers.Conv1D", "bnb.Linear4bit", "bnb.Linear8bitLt"), DoraLinear()
)
variants.register(NAME, ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d"), DoraConv())
variants.register(NAME, ("nn.Embedding",), DoraEmbedding())
