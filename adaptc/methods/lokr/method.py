"""LoKr as an adapter method: per-target settings, the ``lokr_`` branch, its nodes and merge.

Everything here mirrors peft 0.21.2's ``peft/tuners/lokr`` (``layer.py``, ``model.py``)::

    ΔW = reshape((alpha / r) · kron(w1, w2), W₀.shape)        x ↦ W₀x + ΔW x

with ``(out, in) = (a·b, c·d)`` split by :func:`factorization`, ``w1`` (a, c) kept full or
``w1_a (a, r) @ w1_b (r, c)`` (``decompose_both``), ``w2`` (b, d, *kernel) full when
``r ≥ max(b, d)/2``, else ``w2_a (b, r) @ w2_b (r, d·∏kernel)`` or, for a convolution with
``use_effective_conv2d``, the core ``t2`` (r, r, *kernel) contracted with ``w2_a`` (r, b)
and ``w2_b`` (r, d). The update is applied as a layer call with ``ΔW`` (``F.linear``,
``F.conv1d``/``F.conv2d`` with the base's stride, padding, dilation and groups).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.layers import LayerKind
from adaptc.methods.base import Branch, Method, Settings
from adaptc.methods.common import LoraDefaultTargets
from adaptc.methods.lokr.spec import LoKrAdapter

__all__ = ["METHOD", "LoKrBranch", "LoKrMethod", "LoKrSettings", "factorization"]

_CP = "i j k l, i p, j r -> p r k l"  # PEFT's make_weight_cp: t2, w2_a, w2_b -> (b, d, k1, k2)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) ``factorization``: ``(m, n)`` with ``m·n = dimension``, ``m ≤ n``;
    ``m = factor`` when it divides, else the largest split near √dimension not above
    ``factor`` (-1: no bound). ``factorization(128) == (8, 16)``, ``(127) == (1, 127)``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key with ``(.*\\.)?(KEY)$`` matching ``path``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclass(frozen=True)
class LoKrSettings(Settings):
    """One LoKr adapter on one target."""

    adapter: str
    target: str
    r: int
    alpha: float
    out_split: tuple[int, int]  # (a, b): out = a·b
    in_split: tuple[int, int]  # (c, d): in (per group) = c·d
    kernel: tuple[int, ...]  # () for a linear layer
    use_w1: bool  # w1 full (else w1_a @ w1_b)
    use_w2: bool  # w2 full (else w2_a @ w2_b, or the core t2)
    effective_conv: bool  # w2 from t2, w2_a, w2_b
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    init: str = "default"  # "default", "random" or "lycoris"

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The branch's tensors and their shapes, in PEFT's creation order."""
        (a, b), (c, d), k, r = self.out_split, self.in_split, self.kernel, self.r
        out: dict[str, tuple[int, ...]] = {}
        if self.use_w1:
            out["lokr_w1"] = (a, c)
        else:
            out["lokr_w1_a"], out["lokr_w1_b"] = (a, r), (r, c)
        if self.use_w2:
            out["lokr_w2"] = (b, d, *k)
        elif self.effective_conv:
            out["lokr_t2"] = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
            out["lokr_w2_a"], out["lokr_w2_b"] = (r, b), (r, d)
        else:
            out["lokr_w2_a"], out["lokr_w2_b"] = (b, r), (r, d * math.prod(k))
        return out


class LoKrDropout(nn.Module):
    """PEFT's training-time dropouts on ``ΔW``: the whole update skipped with probability
    ``module_dropout`` (drawn first), then each output row zeroed with ``rank_dropout``
    (kept rows divided by their mean when ``scale``). The identity in eval mode."""

    def __init__(self, rank_dropout: float, module_dropout: float, scale: bool) -> None:
        super().__init__()
        self.rank_dropout, self.module_dropout, self.scale = rank_dropout, module_dropout, scale

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return delta
        if self.module_dropout and not bool(torch.rand(1) > self.module_dropout):
            return delta * 0
        if self.rank_dropout:
            drop = (torch.rand(delta.size(0)) > self.rank_dropout).float()
            drop = drop.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)
            if self.scale:
                drop = drop / drop.mean()
            delta = delta * drop
        return delta

    def extra_repr(self) -> str:
        return f"rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}"


class LoKrBranch(Branch):
    """The factors of one adapter on one target, named as PEFT's file keys (``lokr_w1`` or
    ``lokr_w1_a``/``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b`` (+ ``lokr_t2``))."""

    method: ClassVar[str] = "lokr"

    def __init__(
        self, params: dict[str, nn.Parameter], settings: LoKrSettings, weight_shape: torch.Size
    ) -> None:
        super().__init__()
        for name, param in params.items():
            self.register_parameter(name, param)
        self.adapter = settings.adapter
        self.target = settings.target
        self.settings = settings
        self.weight_shape = tuple(weight_shape)
        s = settings
        self.lokr_dropout = (
            LoKrDropout(s.rank_dropout, s.module_dropout, s.rank_dropout_scale)
            if s.rank_dropout > 0 or s.module_dropout > 0
            else None
        )

    def factor(self, name: str) -> torch.Tensor:
        param = getattr(self, name)
        assert isinstance(param, torch.Tensor), name
        return param

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` in the layer's weight shape (no dropout): PEFT's ``get_delta_weight``."""
        s = self.settings
        f = self.factor
        w1 = f("lokr_w1") if s.use_w1 else (f("lokr_w1_a") @ f("lokr_w1_b")).contiguous()
        if s.use_w2:
            w2 = f("lokr_w2")
        elif s.effective_conv:
            w2 = torch.einsum(_CP, f("lokr_t2"), f("lokr_w2_a"), f("lokr_w2_b"))
        else:
            w2 = f("lokr_w2_a") @ f("lokr_w2_b")
        if s.effective_conv and len(s.kernel) == 1:
            w2 = w2.squeeze(-1)
        for _ in range(_w1_dims(s)):
            w1 = w1.unsqueeze(2)
        return (torch.kron(w1, w2.contiguous()) * s.scale).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        s = self.settings
        return f"adapter={self.adapter!r}, r={s.r}, out={s.out_split}, in={s.in_split}"


def _w1_dims(s: LoKrSettings) -> int:
    """How many trailing dimensions ``w1`` gets to match ``w2``: 2 for a 4-D ``w2`` (PEFT's
    ``make_kron``), 1 for Conv1d's core (PEFT's (b, d, k, 1), here squeezed to (b, d, k):
    the same values, and ``torch.kron`` fails on PEFT's), else none."""
    if s.effective_conv:
        return 1 if len(s.kernel) == 1 else 2
    return 2 if s.use_w2 and len(s.kernel) == 2 else 0


def _lokr(settings: Settings) -> LoKrSettings:
    assert isinstance(settings, LoKrSettings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> LoKrBranch:
    assert isinstance(branch, LoKrBranch), type(branch).__name__
    return branch


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKrMethod(Method):
    """LoKr: ``x ↦ W₀x + reshape((alpha/r)·kron(w1, w2)) x``."""

    name = "lokr"
    title = "LoKr"
    prefix = "lokr_"
    branch_type = LoKrBranch
    kinds = ("nn.Linear", "nn.Conv1d", "nn.Conv2d")  # PEFT's LoKrModel layers_mapping
    default_targets = LoraDefaultTargets()

    # --- plan ---------------------------------------------------------------------------
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> LoKrSettings:
        assert isinstance(spec, LoKrAdapter)
        self.check_supported(kind, path)
        shape = tuple(kind.weight(module).shape)  # (out, in/groups, *kernel)
        r = int(pattern_value(spec.rank_pattern, path, spec.r))
        alpha = pattern_value(spec.alpha_pattern, path, spec.alpha)
        out_split = factorization(shape[0], spec.decompose_factor)
        in_split = factorization(shape[1], spec.decompose_factor)
        kernel = tuple(int(k) for k in shape[2:])
        effective = spec.use_effective_conv2d and bool(kernel) and any(k != 1 for k in kernel)
        return LoKrSettings(
            adapter=adapter,
            target=path,
            r=r,
            alpha=alpha,
            out_split=out_split,
            in_split=in_split,
            kernel=kernel,
            use_w1=not (spec.decompose_both and r < max(out_split[0], in_split[0]) / 2),
            use_w2=not (r < max(out_split[1], in_split[1]) / 2),
            effective_conv=effective,
            rank_dropout=spec.rank_dropout,
            module_dropout=spec.module_dropout,
            rank_dropout_scale=spec.rank_dropout_scale,
            init=spec.init,
        )

    def columns(self) -> tuple[str, ...]:
        return ("factors",)

    def row(self, settings: Settings) -> tuple[str, ...]:
        shapes = _lokr(settings).shapes()
        return (", ".join(f"{k[5:]} {'x'.join(map(str, v))}" for k, v in shapes.items()),)

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[LoKrBranch, dict[str, torch.Tensor]]:
        s = _lokr(settings)
        self.check_supported(kind, s.target)
        weight = kind.weight(module)
        shapes = s.shapes()
        meta = weight.device.type == "meta"
        tensors = {k: torch.empty(v, device="meta" if meta else "cpu") for k, v in shapes.items()}
        if not meta:
            _initialise(tensors, s.init)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        params = {
            k: nn.Parameter(t.to(weight.device, dtype) if dtype else t.to(weight.device))
            for k, t in tensors.items()
        }
        return LoKrBranch(params, s, weight.shape), {}

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
        """``out = current + layer(x, reshape(scale * kron(w1, w2)))``.

        Before::

            def forward(self, x):
                fc = self.fc(x);  x = None
                return fc

        After (nn.Linear 16 -> 32, r = 8, alpha = 8: w1 (4, 4), w2 (8, 4))::

            def forward(self, x):
                fc = self.fc(x)
                fc_lokr_default_lokr_w1 = self.fc.lokr_default.lokr_w1
                fc_lokr_default_lokr_w2 = self.fc.lokr_default.lokr_w2
                kron = torch.kron(fc_lokr_default_lokr_w1, fc_lokr_default_lokr_w2)
                mul = kron * 1.0
                reshape = mul.reshape((32, 16))
                linear = torch._C._nn.linear(x, reshape);  x = reshape = None
                add = fc + linear
                return add

        ``w1``/``w2`` are ``matmul`` nodes of their halves when decomposed (``einsum`` of
        ``lokr_t2`` for an effective convolution); a convolution calls ``F.conv1d/2d``
        with the base's stride, padding, dilation and groups. The casts are PEFT's: the
        input to the factors' dtype, the sum back to the layer's.
        """
        b = _branch(branch)
        s = b.settings
        compute = kind.compute_dtype(base)
        own = next(iter(b.parameters())).dtype

        with graph.inserting_before(current.next):

            def get(name: str) -> fx.Node:
                return graph.get_attr(f"{branch_path}.{name}")

            def matmul(left: str, right: str) -> fx.Node:
                return graph.call_function(operator.matmul, (get(left), get(right)))

            w1 = get("lokr_w1") if s.use_w1 else matmul("lokr_w1_a", "lokr_w1_b")  # (a, c)
            if s.use_w2:
                w2 = get("lokr_w2")  # (b, d, *kernel)
            elif s.effective_conv:
                factors = (get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))
                w2 = graph.call_function(torch.einsum, (_CP, *factors))  # (b, d, k1, k2)
                if len(s.kernel) == 1:  # (b, d, k, 1) -> (b, d, k): torch.kron fails on it
                    w2 = graph.call_method("squeeze", (w2, -1))
            else:
                w2 = matmul("lokr_w2_a", "lokr_w2_b")  # (b, d·∏kernel)
            for _ in range(_w1_dims(s)):
                w1 = graph.call_method("unsqueeze", (w1, 2))  # (a, c, 1, 1) for w2 (b, d, k, k)
            if not s.use_w1:  # not in PEFT: kron can fail on a rank-1 product's strides
                w1 = graph.call_method("contiguous", (w1,))
            if not s.use_w2:
                w2 = graph.call_method("contiguous", (w2,))  # PEFT's: kron needs it (einsum)
            delta = graph.call_function(torch.kron, (w1, w2))
            delta = graph.call_function(operator.mul, (delta, s.scale))
            delta = graph.call_method("reshape", (delta, b.weight_shape))  # W₀'s shape
            if b.lokr_dropout is not None:
                delta = graph.call_module(f"{branch_path}.lokr_dropout", (delta,))
            h: fx.Node = x
            if own != compute:
                h = graph.call_method("to", (h, own))
            if not s.kernel:
                h = graph.call_function(F.linear, (h, delta))
            else:
                assert isinstance(base, nn.modules.conv._ConvNd)
                conv = F.conv1d if len(s.kernel) == 1 else F.conv2d
                options: dict[str, fx.node.Argument] = {
                    "stride": base.stride,
                    "padding": base.padding,
                    "dilation": base.dilation,
                    "groups": base.groups,
                }
                h = graph.call_function(conv, (h, delta), options)
            out = graph.call_function(operator.add, (current, h))
            if own != compute:
                out = graph.call_method("to", (out, compute))
        return out

    # --- merge --------------------------------------------------------------------------
    def merge(
        self,
        kind: LayerKind,
        module: nn.Module,
        branch: Branch,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PEFT's merge: ``W + ΔW``; the bias unchanged."""
        delta = _branch(branch).delta_weight().detach()
        return (weight + delta.to(weight.device)).to(weight.dtype), bias


def _initialise(tensors: dict[str, torch.Tensor], init: str) -> None:
    """PEFT's ``reset_adapter_parameters`` (``default``), ``_random`` and ``_lycoris_way``,
    in its order (the draws come from the global generator, as PEFT's)."""
    zeros: set[str] = set()
    if init == "default":
        zeros = {"lokr_w1", "lokr_w1_a"}
    elif init == "lycoris":
        zeros = {"lokr_w2", "lokr_w2_b"}
    with torch.no_grad():
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if name in tensors:
                if name in zeros:
                    tensors[name].zero_()
                else:
                    _kaiming(tensors[name])
        if "lokr_t2" in tensors:
            _kaiming(tensors["lokr_t2"])


METHOD = LoKrMethod()
