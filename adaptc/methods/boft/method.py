"""BOFT as an adapter method: per-target settings, the ``boft_R``/``boft_s`` branch, its
nodes and merge.

The maths are peft 0.21.2's ``peft/tuners/boft/layer.py`` (its pure-torch path):
``boft_R`` (m, D, b, b) holds, per butterfly factor ``i < m``, ``D`` square blocks; each
becomes orthogonal by the Cayley transform of its skew part ``Q = ½(A − Aᵀ)``,
``(I+Q)⁻¹(I−Q)``; the blocks on the diagonal, conjugated by the factor's butterfly
permutation ``P_i`` (the non-persistent buffer ``boft_P``), give ``B_i = P_i·BD_i·P_iᵀ``
and ``R = B_{m−1}⋯B_0``. ``boft_s`` scales the output channels. The layer computes with
``W = diag(s)·W₀·Rᵀ``, bias unchanged, which is also the merged weight.

* ``nn.Linear``: as PEFT's forward, the input is rotated (``x·R``) and the output without
  its bias scaled: ``y = (W₀(xR)+b − b)·s + b``, emitted as ``y₀ + (y₀ − b)·(s − 1)``.
* ``nn.Conv2d``: ``conv(x, W₀) + conv(x, diag(s)·W₀·Rᵀ − W₀)`` (PEFT convolves with the
  rotated filter directly; equal up to rounding).

A LoRA branch on the same layer reads the unrotated input and adds its own change.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.layers import LayerKind
from adaptc.methods.base import Branch, Method, Settings
from adaptc.methods.boft.spec import BOFTAdapter, resolve_blocks
from adaptc.methods.common import (
    LoraDefaultTargets,
    adapter_dtype,
    layer_input,
    set_layer_input,
)

__all__ = ["METHOD", "BOFTBranch", "BOFTMethod", "BOFTSettings", "butterfly_perm"]

_CONV = "nn.Conv2d"


@dataclass(frozen=True)
class BOFTSettings(Settings):
    """One BOFT adapter on one target."""

    adapter: str
    target: str
    features: int  # the rotated dimension: in_features, or in_channels·k·k
    out_features: int
    factors: int  # butterfly factors (PEFT's boft_n_butterfly_factor)
    block_num: int
    block_size: int
    dropout: float = 0.0
    init: str = "identity"


def butterfly_perm(n: int, b: int, r: int, factors: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm``: the indices of the permutation that, within each of
    ``b`` groups of ``n // b``, puts the even runs of ``r`` before the odd ones."""
    if factors == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    size = n // b
    step = size // r
    order = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
    within = torch.cat([torch.arange(int(p) * r, int(p) * r + r) for p in order])
    indices = torch.arange(n)
    for i in range(0, n, size):
        indices[i : i + size] = indices[i : i + size][within]
    return indices


def permutations(s: BOFTSettings) -> torch.Tensor:  # (m, f, f)
    """The ``boft_P`` buffer: one permutation matrix per butterfly factor."""
    out = torch.zeros(s.factors, s.features, s.features)
    for i in range(s.factors):
        perm = butterfly_perm(s.features, s.block_num // 2**i, s.block_size // 2, s.factors - 1)
        out[i, torch.arange(s.features), perm] = 1.0
    return out


def cayley(data: torch.Tensor) -> torch.Tensor:  # (n, b, b) -> (n, b, b)
    """PEFT's ``cayley_batch``: ``(I+Q)⁻¹(I−Q)`` with ``Q = ½(A − Aᵀ)``."""
    n, b, _ = data.shape
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(b, device=data.device).unsqueeze(0).expand(n, b, b)
    out: torch.Tensor = torch.linalg.solve(eye + skew, eye - skew, left=False)
    return out.to(data.dtype)


def block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:  # (m, D, b, b)
    """PEFT's ``MultiplicativeDropoutLayer`` (training): ``int(p·D)`` random blocks of one
    random butterfly factor become the identity."""
    m, d, b, _ = blocks.shape
    which = int(torch.randint(0, m, (1,)).item())
    count = int(p * d)
    mask = torch.cat([torch.ones(count), torch.zeros(d - count)])[torch.randperm(d)]
    full = torch.zeros(m, d, 1, 1, device=blocks.device)
    full[which] = mask.view(d, 1, 1).to(blocks.device)
    eye = torch.eye(b, device=blocks.device).repeat(m, d, 1, 1)
    return (1 - full) * blocks + full * eye


class BOFTBranch(Branch):
    """``boft_R`` and ``boft_s`` of one adapter on one target (and the ``boft_P`` buffer)."""

    method: ClassVar[str] = "boft"
    boft_P: torch.Tensor

    def __init__(
        self,
        boft_R: nn.Parameter,
        boft_s: nn.Parameter,
        perms: torch.Tensor,
        settings: BOFTSettings,
        conv: dict[str, Any],
    ) -> None:
        super().__init__()
        self.boft_R = boft_R
        self.boft_s = boft_s  # (out, 1) for Linear, (1, out) for Conv2d, as PEFT
        self.register_buffer("boft_P", perms, persistent=False)
        self.adapter = settings.adapter
        self.target = settings.target
        self.block_num = settings.block_num
        self.block_size = settings.block_size
        self.dropout = settings.dropout
        self.conv = conv  # stride/padding/dilation/groups of a convolution ({} for Linear)

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "boft_R", self.boft_R
        yield "boft_s", self.boft_s

    def scale(self) -> torch.Tensor:  # (out, 1)
        return self.boft_s.transpose(0, 1) if self.conv else self.boft_s

    def matrix(self) -> torch.Tensor:  # (f, f)
        """``R``, PEFT's ``butterfly_oft_mat`` (dropout applies in training)."""
        m, d, b, _ = self.boft_R.shape
        blocks = cayley(self.boft_R.reshape(m * d, b, b)).view(m, d, b, b)
        if self.training and self.dropout > 0.0:
            blocks = block_dropout(blocks, self.dropout)
        diag = torch.stack(
            [torch.block_diag(*blocks[i].unbind(0)) for i in range(m)]  # type: ignore[no-untyped-call]
        )
        perms = self.boft_P.to(diag.device, diag.dtype)
        batch = torch.bmm(perms, torch.bmm(diag, perms.permute(0, 2, 1)))  # (m, f, f)
        out = batch[0]
        for i in range(1, m):
            out = batch[i] @ out
        return out

    def transformed(self, weight: torch.Tensor) -> torch.Tensor:
        """``diag(s)·W·Rᵀ`` for ``weight`` (out, in[, k, k]), in the weight's dtype (PEFT's
        merge)."""
        mat = self.matrix()
        flat = weight.reshape(weight.shape[0], -1)  # (out, f)
        out = torch.mm(mat, flat.t().to(mat.dtype)).t() * self.scale()
        return out.reshape(weight.shape).contiguous().to(weight.dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Linear: ``x`` (…, in) rotated, ``x·R`` in x's dtype (PEFT's forward).
        Conv2d (``weight`` given): ``conv(x, diag(s)·W·Rᵀ − W)``, the output's change."""
        if weight is not None:
            delta = self.transformed(weight) - weight
            return F.conv2d(x, delta.to(x.dtype), None, **self.conv)
        return x @ self.matrix().to(x.dtype)

    def extra_repr(self) -> str:
        m = self.boft_R.shape[0]
        return (
            f"adapter={self.adapter!r}, factors={m}, blocks={self.block_num}, "
            f"block_size={self.block_size}"
        )


def rescale(
    current: torch.Tensor, base: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``current + (base − b)·(s − 1)``: PEFT's ``(y − b)·s + b`` as a change of ``current``."""
    out = base if bias is None else base - bias
    return current + (out * (s.squeeze(-1) - 1)).to(current.dtype)


def _boft(settings: Settings) -> BOFTSettings:
    assert isinstance(settings, BOFTSettings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> BOFTBranch:
    assert isinstance(branch, BOFTBranch), type(branch).__name__
    return branch


class BOFTMethod(Method):
    """BOFT: the layer computes with ``diag(s)·W₀·Rᵀ``, ``R`` a butterfly orthogonal matrix."""

    name = "boft"
    title = "BOFT"
    prefix = "boft_"
    branch_type = BOFTBranch
    kinds = ("nn.Linear", _CONV)
    default_targets = LoraDefaultTargets()

    # --- plan ---------------------------------------------------------------------------
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> BOFTSettings:
        assert isinstance(spec, BOFTAdapter)
        features, out_features = kind.features(module)[:2]
        what = "in_features"
        if isinstance(module, nn.Conv2d):
            features *= module.kernel_size[0] * module.kernel_size[0]
            what = "Convolutional kernel dimension"
        try:
            factors, num, size = resolve_blocks(spec, features, what)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return BOFTSettings(
            adapter=adapter,
            target=path,
            features=features,
            out_features=out_features,
            factors=factors,
            block_num=num,
            block_size=size,
            dropout=spec.boft_dropout,
            init=spec.init,
        )

    def check(self, kind: LayerKind, module: nn.Module, settings: Settings) -> list[str]:
        s = _boft(settings)
        self.check_supported(kind, s.target)
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size
            if module.groups > 1:
                raise ValueError(
                    f"{s.target}: BOFT does not support Conv2d layers with groups > 1 "
                    f"(got groups={module.groups})"
                )
            if (
                k[0] != k[1]
                or module.dilation != (1, 1)
                or module.padding_mode != "zeros"
                or isinstance(module.padding, str)
            ):
                raise ValueError(
                    f"{s.target}: BOFT supports Conv2d layers with a square kernel, dilation 1, "
                    f"numeric padding and padding_mode='zeros' (got kernel {tuple(k)}, "
                    f"dilation={module.dilation}, padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r})"
                )
        return []

    def columns(self) -> tuple[str, ...]:
        return ("factors", "blocks", "block")

    def row(self, settings: Settings) -> tuple[str, ...]:
        s = _boft(settings)
        return (str(s.factors), str(s.block_num), str(s.block_size))

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[BOFTBranch, dict[str, torch.Tensor]]:
        s = _boft(settings)
        self.check(kind, module, s)
        weight = kind.weight(module)
        conv = isinstance(module, nn.Conv2d)
        r_shape = (s.factors, s.block_num, s.block_size, s.block_size)
        s_shape = (1, s.out_features) if conv else (s.out_features, 1)
        dtype, device = adapter_dtype(weight), weight.device
        if device.type == "meta":
            r = torch.empty(r_shape, dtype=dtype, device="meta")
            scale = torch.empty(s_shape, dtype=dtype, device="meta")
            perms = torch.empty(s.factors, s.features, s.features, device="meta")
        else:
            if s.init == "random":
                r = torch.empty(r_shape).normal_(0.0, 0.1)
                scale = torch.empty(s_shape).normal_(1.0, 0.1)
            else:
                r, scale = torch.zeros(r_shape), torch.ones(s_shape)
            r, scale = r.to(device, dtype), scale.to(device, dtype)
            perms = permutations(s).to(device)
        options: dict[str, Any] = {}
        if conv:
            assert isinstance(module, nn.Conv2d)
            options = {"stride": module.stride, "padding": module.padding}
        branch = BOFTBranch(nn.Parameter(r), nn.Parameter(scale), perms, s, options)
        return branch, {}

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
        """Linear: rotate the layer's input, rescale its output. Before::

            def forward(self, x):
                fc = self.fc(x);  x = None
                return fc

        After::

            def forward(self, x):
                fc_boft_default = self.fc.boft_default(x);  x = None
                fc = self.fc(fc_boft_default);  fc_boft_default = None
                fc_boft_s = self.fc.boft_default.boft_s
                fc_bias = self.fc.bias
                rescale = adaptc_methods_boft_method_rescale(fc, fc, fc_boft_s, fc_bias)
                return rescale

        Conv2d: add the change of the output, ``conv(x, diag(s)·W·Rᵀ − W)``.
        """
        b = _branch(branch)
        if not b.conv:
            with graph.inserting_before(call):
                rotated = graph.call_module(branch_path, (layer_input(call),))
            set_layer_input(call, rotated)
            with graph.inserting_before(current.next):
                s = graph.get_attr(f"{branch_path}.boft_s")
                bias = (
                    graph.get_attr(f"{call.target}.bias")
                    if getattr(base, "bias", None) is not None
                    else None
                )
                return graph.call_function(rescale, (current, call, s, bias))
        with graph.inserting_before(current.next):
            weight = graph.get_attr(f"{call.target}.weight")
            delta = graph.call_module(branch_path, (x, weight))
            return graph.call_function(operator.add, (current, delta))

    # --- merge --------------------------------------------------------------------------
    def merge(
        self,
        kind: LayerKind,
        module: nn.Module,
        branch: Branch,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PEFT's merge: ``diag(s)·W·Rᵀ`` (a new tensor, in the weight's dtype); bias kept."""
        b = _branch(branch)
        with torch.no_grad():
            return b.transformed(weight.detach()), bias


METHOD = BOFTMethod()
