"""OFT as an adapter method: per-target settings, the ``oft_R`` branch, its nodes and merge.

The maths are peft 0.21.2's ``peft/tuners/oft/layer.py`` (``OFTRotationModule``): the
trainable tensor ``oft_R.weight`` (r, b·(b−1)/2) holds the upper triangles of ``r``
skew-symmetric blocks ``Q``; the Cayley transform ``R = (I+Q)⁻¹(I−Q)`` (or its Neumann
series ``I + 2Q + 2Q² + … + Qⁿ⁻¹``) makes each orthogonal; the layer's input features,
cut into ``r`` groups of ``b``, are rotated: ``x ↦ W₀(x·R_bd)`` (row vectors), i.e. the
layer computes with ``W₀·R_bdᵀ``, which is also the merged weight.

* ``nn.Linear``: the input is rotated, exactly as PEFT's forward does.
* ``nn.Conv2d``: the filter (in·k·k, in PEFT's order) is rotated: the output is
  ``conv(x, W₀) + conv(x, W₀R_bdᵀ − W₀)``, which equals the merged layer. PEFT instead
  rotates unfolded k×k input patches and folds them back, summing overlaps: for k > 1
  its unmerged output is not its merged one, and at identity init not the base (a peft
  bug, see docs/methods/oft.md); for 1×1 convolutions both agree.
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
from adaptc.methods.common import (
    LoraDefaultTargets,
    adapter_dtype,
    layer_input,
    set_layer_input,
)
from adaptc.methods.oft.spec import OFTAdapter, resolve_blocks

__all__ = ["METHOD", "OFTBranch", "OFTMethod", "OFTRotation", "OFTSettings"]

_CONV = "nn.Conv2d"


@dataclass(frozen=True)
class OFTSettings(Settings):
    """One OFT adapter on one target."""

    adapter: str
    target: str
    features: int  # the rotated dimension: in_features, or in_channels·k·k
    r: int  # number of blocks (PEFT's resolved r)
    block_size: int
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init: str = "identity"
    note: str | None = None  # PEFT's warning when r / oft_block_size was adjusted


def cayley(
    q: torch.Tensor, block_size: int, *, neumann: bool, terms: int
) -> torch.Tensor:  # (n, b·(b−1)/2) -> (n, b, b)
    """PEFT's ``_cayley_batch``: orthogonal blocks from their skew-symmetric parameters."""
    n = q.shape[0]
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=q.device)
    skew = torch.zeros(n, block_size, block_size, device=q.device, dtype=q.dtype)
    skew[:, rows, cols] = q
    skew = skew - skew.transpose(-2, -1)
    if neumann:
        out = torch.eye(block_size, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
        if terms > 1:
            out = out + 2.0 * skew
            if terms > 2:
                square = torch.bmm(skew, skew)
                out = out + 2.0 * square
                power = square
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, skew)
                    out = out + 2.0 * power
                power = torch.bmm(power, skew)
                out = out + power
        return out.to(q.dtype)
    eye = torch.eye(block_size, device=q.device).unsqueeze(0).expand(n, block_size, block_size)
    exact: torch.Tensor = torch.linalg.solve(eye + skew, eye - skew, left=False)
    return exact.to(q.dtype)


def coft_project(q: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's ``_project_batch``: each block's skew matrix scaled into a ball of radius
    ``eps/√n`` (the parameters, as the upper triangles)."""
    n = q.shape[0]
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=q.device)
    skew = torch.zeros(n, block_size, block_size, device=q.device, dtype=q.dtype)
    skew[:, rows, cols] = q
    skew = skew - skew.transpose(-2, -1)
    radius = eps * 1 / torch.sqrt(torch.tensor(n))
    norm = torch.norm(skew, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= radius, skew, radius * (skew / norm))
    return out[:, rows, cols]


class OFTRotation(nn.Module):
    """PEFT's ``OFTRotationModule`` parameter holder: ``weight`` (blocks, b·(b−1)/2)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


class OFTBranch(Branch):
    """``oft_R.weight`` of one adapter on one target, and the rotation it defines."""

    method: ClassVar[str] = "oft"

    def __init__(self, weight: nn.Parameter, settings: OFTSettings, conv: dict[str, Any]) -> None:
        super().__init__()
        self.oft_R = OFTRotation(weight)
        self.adapter = settings.adapter
        self.target = settings.target
        self.r = settings.r
        self.block_size = settings.block_size
        self.block_share = settings.block_share
        self.coft = settings.coft
        self.eps = settings.eps
        self.neumann = settings.use_cayley_neumann
        self.terms = settings.num_cayley_neumann_terms
        self.conv = conv  # stride/padding/dilation/groups of a convolution ({} for Linear)

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "oft_R.weight", self.oft_R.weight

    def blocks(self) -> torch.Tensor:  # (r, b, b)
        """The orthogonal blocks (COFT first projects the parameters in place, as PEFT)."""
        weight = self.oft_R.weight
        if self.coft:
            with torch.no_grad():
                weight.copy_(coft_project(weight, self.block_size, self.eps))
        out = cayley(weight, self.block_size, neumann=self.neumann, terms=self.terms)
        return out.repeat(self.r, 1, 1) if self.block_share else out

    def matrix(self) -> torch.Tensor:  # (features, features)
        """``R_bd``, PEFT's ``get_delta_weight``: the blocks on the diagonal."""
        out: torch.Tensor = torch.block_diag(*self.blocks().unbind(0))  # type: ignore[no-untyped-call]
        return out

    def rotated(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out, in[, k, k]) with its input features rotated: ``W·R_bdᵀ``, in the
        weight's dtype (PEFT's merge)."""
        mat = self.matrix()
        flat = weight.reshape(weight.shape[0], -1)  # (out, features)
        out = torch.mm(mat, flat.t().to(mat.dtype)).t()
        return out.reshape(weight.shape).contiguous().to(weight.dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Linear: ``x`` (…, in) rotated, ``x·R_bd`` in x's dtype (PEFT's forward).
        Conv2d (``weight`` given): ``conv(x, W·R_bdᵀ − W)``, the output's change."""
        if weight is not None:
            delta = self.rotated(weight) - weight
            return F.conv2d(x, delta.to(x.dtype), None, **self.conv)
        dtype = x.dtype
        blocks = self.blocks()
        x = x.to(blocks.dtype)
        shape = x.shape
        parts = x.reshape(*shape[:-1], self.r, self.block_size)  # (…, r, b)
        out = torch.einsum("...rk,rkc->...rc", parts, blocks)
        return out.reshape(shape).to(dtype)

    def extra_repr(self) -> str:
        share = ", block_share" if self.block_share else ""
        return f"adapter={self.adapter!r}, r={self.r}, block_size={self.block_size}{share}"


def _oft(settings: Settings) -> OFTSettings:
    assert isinstance(settings, OFTSettings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> OFTBranch:
    assert isinstance(branch, OFTBranch), type(branch).__name__
    return branch


class OFTMethod(Method):
    """OFT: ``x ↦ W₀(R x)`` with a block-diagonal orthogonal ``R``."""

    name = "oft"
    title = "OFT"
    prefix = "oft_"
    branch_type = OFTBranch
    kinds = ("nn.Linear", _CONV)
    default_targets = LoraDefaultTargets()

    # --- plan ---------------------------------------------------------------------------
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> OFTSettings:
        assert isinstance(spec, OFTAdapter)
        features = kind.features(module)[0]
        if kind.name == _CONV:
            assert isinstance(module, nn.Conv2d)
            features *= module.kernel_size[0] * module.kernel_size[0]
        r, size, note = resolve_blocks(spec, features)
        return OFTSettings(
            adapter=adapter,
            target=path,
            features=features,
            r=r,
            block_size=size,
            block_share=spec.block_share,
            coft=spec.coft,
            eps=spec.eps,
            use_cayley_neumann=spec.use_cayley_neumann,
            num_cayley_neumann_terms=spec.num_cayley_neumann_terms,
            init=spec.init,
            note=f"{path}: {note}" if note else None,
        )

    def check(self, kind: LayerKind, module: nn.Module, settings: Settings) -> list[str]:
        s = _oft(settings)
        self.check_supported(kind, s.target)
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size
            if module.dilation[0] > 1:
                raise ValueError(f"{s.target}: Conv2d with dilation > 1 is not supported by OFT")
            if k[0] != k[1] or module.groups != 1 or module.padding_mode != "zeros":
                raise ValueError(
                    f"{s.target}: OFT supports Conv2d layers with a square kernel, groups=1 "
                    f"and padding_mode='zeros' (got kernel {tuple(k)}, groups={module.groups}, "
                    f"padding_mode={module.padding_mode!r})"
                )
        return [s.note] if s.note else []

    def columns(self) -> tuple[str, ...]:
        return ("r", "block")

    def row(self, settings: Settings) -> tuple[str, ...]:
        s = _oft(settings)
        return (str(s.r), str(s.block_size))

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[OFTBranch, dict[str, torch.Tensor]]:
        s = _oft(settings)
        self.check(kind, module, s)
        weight = kind.weight(module)
        shape = (1 if s.block_share else s.r, s.block_size * (s.block_size - 1) // 2)
        dtype = adapter_dtype(weight)
        if weight.device.type == "meta":
            data = torch.empty(shape, dtype=dtype, device="meta")
        elif s.init == "random":
            data = torch.empty(shape).normal_(0.0, 0.1).to(weight.device, dtype)
        else:
            data = torch.zeros(shape, dtype=dtype, device=weight.device)
        conv: dict[str, Any] = {}
        if isinstance(module, nn.Conv2d):
            conv = {
                "stride": module.stride,
                "padding": module.padding,
                "dilation": module.dilation,
                "groups": module.groups,
            }
        return OFTBranch(nn.Parameter(data), s, conv), {}

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
        """Linear: rotate the layer's input. Before::

            def forward(self, x):
                fc = self.fc(x);  x = None
                return fc

        After::

            def forward(self, x):
                fc_oft_default = self.fc.oft_default(x);  x = None
                fc = self.fc(fc_oft_default);  fc_oft_default = None
                return fc

        Conv2d: add the change of the output, ``conv(x, W·Rᵀ − W)``::

            def forward(self, x):
                conv = self.conv(x)
                conv_weight = self.conv.weight
                conv_oft_default = self.conv.oft_default(x, conv_weight);  x = None
                add = conv + conv_oft_default;  conv = conv_oft_default = None
                return add

        A LoRA branch on the same layer reads the unrotated input (the sum of effects):
        OFT rotates the base layer only.
        """
        b = _branch(branch)
        if not b.conv:
            with graph.inserting_before(call):
                rotated = graph.call_module(branch_path, (layer_input(call),))
            set_layer_input(call, rotated)
            return current
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
        """PEFT's merge: ``W·R_bdᵀ`` (a new tensor, in the weight's dtype); bias unchanged."""
        b = _branch(branch)
        with torch.no_grad():
            return b.rotated(weight.detach()), bias


METHOD = OFTMethod()
