"""LoHa as an adapter method: per-target settings, the ``hada_`` branch, its nodes and merge.

Everything here mirrors peft 0.21.2's ``peft/tuners/loha`` (``layer.py``, ``model.py``)::

    ΔW = reshape((w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r, W₀.shape)      x ↦ W₀x + ΔW x

with ``w*_a`` (out, r) and ``w*_b`` (r, in·∏kernel); for a convolution with a kernel larger
than 1 and ``use_effective_conv2d``, each factor is rebuilt from a core ``t*`` (r, r,
*kernel) as ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`` with ``w*_a`` (r, out)
and ``w*_b`` (r, in). The update is applied as a layer call with ``ΔW`` (``F.linear``,
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
from adaptc.methods.loha.spec import LoHaAdapter

__all__ = ["METHOD", "LoHaBranch", "LoHaMethod", "LoHaSettings"]

_CP = "i j k l, j r, i p -> p r k l"  # PEFT's HadaWeightCP: t, w_b, w_a -> (out, in, k1, k2)


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key with ``(.*\\.)?(KEY)$`` matching ``path``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclass(frozen=True)
class LoHaSettings(Settings):
    """One LoHa adapter on one target."""

    adapter: str
    target: str
    r: int
    alpha: float
    out_features: int
    in_features: int  # per group
    kernel: tuple[int, ...]  # () for a linear layer
    effective_conv: bool  # factors from the cores t1, t2
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init: str = "default"  # "default" or "random"

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The branch's tensors and their shapes (PEFT's ``create_adapter_parameters``)."""
        o, i, k, r = self.out_features, self.in_features, self.kernel, self.r
        if self.effective_conv:
            core = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
            return {
                "hada_t1": core,
                "hada_w1_a": (r, o),
                "hada_w1_b": (r, i),
                "hada_t2": core,
                "hada_w2_a": (r, o),
                "hada_w2_b": (r, i),
            }
        flat = i * math.prod(k)
        return {
            "hada_w1_a": (o, r),
            "hada_w1_b": (r, flat),
            "hada_w2_a": (o, r),
            "hada_w2_b": (r, flat),
        }


class LoHaDropout(nn.Module):
    """PEFT's training-time dropouts on ``ΔW``: the whole update skipped with probability
    ``module_dropout`` (drawn first), then each output row zeroed with ``rank_dropout`` and
    the kept rows divided by their mean (PEFT always rescales). The identity in eval mode."""

    def __init__(self, rank_dropout: float, module_dropout: float) -> None:
        super().__init__()
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return delta
        if not bool(torch.rand(1) > self.module_dropout):
            return delta * 0
        if self.rank_dropout:
            drop = (torch.rand(delta.size(0)) > self.rank_dropout).to(delta.dtype)
            drop = drop.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)
            delta = delta * (drop / drop.mean())
        return delta

    def extra_repr(self) -> str:
        return f"rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}"


class LoHaBranch(Branch):
    """The factors of one adapter on one target, named as PEFT's file keys (``hada_w1_a``,
    ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, and ``hada_t1``/``hada_t2``)."""

    method: ClassVar[str] = "loha"

    def __init__(
        self, params: dict[str, nn.Parameter], settings: LoHaSettings, weight_shape: torch.Size
    ) -> None:
        super().__init__()
        for name, param in params.items():
            self.register_parameter(name, param)
        self.adapter = settings.adapter
        self.target = settings.target
        self.settings = settings
        self.weight_shape = tuple(weight_shape)
        s = settings
        self.hada_dropout = (
            LoHaDropout(s.rank_dropout, s.module_dropout)
            if s.rank_dropout > 0 or s.module_dropout > 0
            else None
        )

    def factor(self, name: str) -> torch.Tensor:
        param = getattr(self, name)
        assert isinstance(param, torch.Tensor), name
        return param

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` in the layer's weight shape (no dropout): PEFT's ``get_delta_weight``."""
        f = self.factor
        if self.settings.effective_conv:
            w1 = torch.einsum(_CP, f("hada_t1"), f("hada_w1_b"), f("hada_w1_a"))
            w2 = torch.einsum(_CP, f("hada_t2"), f("hada_w2_b"), f("hada_w2_a"))
        else:
            w1 = f("hada_w1_a") @ f("hada_w1_b")
            w2 = f("hada_w2_a") @ f("hada_w2_b")
        return (w1 * w2 * self.settings.scale).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        s = self.settings
        return f"adapter={self.adapter!r}, r={s.r}, effective_conv={s.effective_conv}"


def _loha(settings: Settings) -> LoHaSettings:
    assert isinstance(settings, LoHaSettings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> LoHaBranch:
    assert isinstance(branch, LoHaBranch), type(branch).__name__
    return branch


class LoHaMethod(Method):
    """LoHa: ``x ↦ W₀x + reshape((alpha/r)·(w1_a @ w1_b) ⊙ (w2_a @ w2_b)) x``."""

    name = "loha"
    title = "LoHa"
    prefix = "hada_"
    branch_type = LoHaBranch
    kinds = ("nn.Linear", "nn.Conv1d", "nn.Conv2d")  # PEFT's LoHaModel layers_mapping
    default_targets = LoraDefaultTargets()

    # --- plan ---------------------------------------------------------------------------
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> LoHaSettings:
        assert isinstance(spec, LoHaAdapter)
        self.check_supported(kind, path)
        shape = tuple(kind.weight(module).shape)  # (out, in/groups, *kernel)
        kernel = tuple(int(k) for k in shape[2:])
        return LoHaSettings(
            adapter=adapter,
            target=path,
            r=int(pattern_value(spec.rank_pattern, path, spec.r)),
            alpha=pattern_value(spec.alpha_pattern, path, spec.alpha),
            out_features=int(shape[0]),
            in_features=int(shape[1]),
            kernel=kernel,
            effective_conv=spec.use_effective_conv2d and any(k != 1 for k in kernel),
            rank_dropout=spec.rank_dropout,
            module_dropout=spec.module_dropout,
            init=spec.init,
        )

    def columns(self) -> tuple[str, ...]:
        return ("factors",)

    def row(self, settings: Settings) -> tuple[str, ...]:
        shapes = _loha(settings).shapes()
        return (", ".join(f"{k[5:]} {'x'.join(map(str, v))}" for k, v in shapes.items()),)

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[LoHaBranch, dict[str, torch.Tensor]]:
        s = _loha(settings)
        self.check_supported(kind, s.target)
        weight = kind.weight(module)
        meta = weight.device.type == "meta"
        shapes = s.shapes()
        tensors = {k: torch.empty(v, device="meta" if meta else "cpu") for k, v in shapes.items()}
        if not meta:
            _initialise(tensors, s.init)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        params = {
            k: nn.Parameter(t.to(weight.device, dtype) if dtype else t.to(weight.device))
            for k, t in tensors.items()
        }
        return LoHaBranch(params, s, weight.shape), {}

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
        """``out = current + layer(x, reshape((w1_a @ w1_b) * (w2_a @ w2_b) * scale))``.

        Before::

            def forward(self, x):
                fc = self.fc(x);  x = None
                return fc

        After (nn.Linear 16 -> 32, r = 8, alpha = 8)::

            def forward(self, x):
                fc = self.fc(x)
                fc_hada_default_hada_w1_a = self.fc.hada_default.hada_w1_a
                fc_hada_default_hada_w1_b = self.fc.hada_default.hada_w1_b
                matmul = fc_hada_default_hada_w1_a @ fc_hada_default_hada_w1_b
                fc_hada_default_hada_w2_a = self.fc.hada_default.hada_w2_a
                fc_hada_default_hada_w2_b = self.fc.hada_default.hada_w2_b
                matmul_1 = fc_hada_default_hada_w2_a @ fc_hada_default_hada_w2_b
                mul = matmul * matmul_1
                mul_1 = mul * 1.0
                reshape = mul_1.reshape((32, 16))
                linear = torch._C._nn.linear(x, reshape);  x = reshape = None
                add = fc + linear
                return add

        With ``use_effective_conv2d`` on a convolution, each product is an ``einsum`` of its
        core; a convolution calls ``F.conv1d/2d`` with the base's stride, padding, dilation
        and groups. The casts are PEFT's: the input to the factors' dtype, the sum back to
        the layer's.
        """
        b = _branch(branch)
        s = b.settings
        compute = kind.compute_dtype(base)
        own = next(iter(b.parameters())).dtype

        with graph.inserting_before(current.next):

            def get(name: str) -> fx.Node:
                return graph.get_attr(f"{branch_path}.{name}")

            def product(i: int) -> fx.Node:
                if s.effective_conv:
                    factors = (get(f"hada_t{i}"), get(f"hada_w{i}_b"), get(f"hada_w{i}_a"))
                    return graph.call_function(torch.einsum, (_CP, *factors))
                return graph.call_function(
                    operator.matmul, (get(f"hada_w{i}_a"), get(f"hada_w{i}_b"))
                )

            delta = graph.call_function(operator.mul, (product(1), product(2)))
            delta = graph.call_function(operator.mul, (delta, s.scale))
            delta = graph.call_method("reshape", (delta, b.weight_shape))  # W₀'s shape
            if b.hada_dropout is not None:
                delta = graph.call_module(f"{branch_path}.hada_dropout", (delta,))
            h: fx.Node = x
            if own != compute:
                h = graph.call_method("to", (h, own))
            if not s.kernel:
                h = graph.call_function(F.linear, (h, delta))
            else:
                assert isinstance(base, nn.modules.conv._ConvNd)
                conv = F.conv1d if len(s.kernel) == 1 else F.conv2d
                options: dict[str, Any] = {
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
    """PEFT's ``reset_adapter_parameters`` (``default``: ``w2_b`` zeros) and
    ``reset_adapter_parameters_random``, in its order (draws from the global generator)."""
    with torch.no_grad():
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
            if name not in tensors:
                continue
            if name == "hada_w2_b" and init == "default":
                tensors[name].zero_()
            else:
                nn.init.kaiming_uniform_(tensors[name], a=math.sqrt(5))


METHOD = LoHaMethod()
