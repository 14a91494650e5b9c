"""AdaLoRA as an adapter method: per-target settings, the ``lora_`` SVD branch, its nodes
and merge, and the orthogonal regulariser on the model's loss.

It mirrors peft 0.21.2's ``peft/tuners/adalora`` (``layer.py``: ``SVDLinear``;
``model.py``: ``AdaLoraModel.forward``): ``x ↦ W₀x + (dropout(x) @ (A⊙E)ᵀ @ Bᵀ)·s /
(ranknum + 1e-5)`` with ``s = lora_alpha`` (``init_r`` when not positive) and ``ranknum``
the initial rank ``init_r`` (a frozen buffer, never saved). The rank allocator that masks
``E`` during training is :mod:`adaptc.methods.adalora.allocate`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from adaptc.layers import LayerKind
from adaptc.methods.adalora.allocate import AdaLoraState, orthogonal_regulariser
from adaptc.methods.adalora.defaults import ADALORA_TARGET_MODULES
from adaptc.methods.adalora.spec import AdaLoraAdapter
from adaptc.methods.base import Branch, Method, Settings

__all__ = ["METHOD", "AdaLoraBranch", "AdaLoraMethod", "AdaLoraSettings", "FrozenRank"]

STATE = "_adaptc_adalora"  # the compiled root's __dict__ key: adapter -> AdaLoraState


class FrozenRank(nn.Parameter):
    """``ranknum``: a parameter (counted as PEFT counts it, never saved) that never trains:
    ``requires_grad_`` leaves it frozen."""

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> FrozenRank:
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenRank:
        return self


@dataclass(frozen=True)
class AdaLoraSettings(Settings):
    """One AdaLoRA adapter on one target."""

    adapter: str
    target: str
    r: int  # the branch's rank now (init_r, or the kept triplets of rank_pattern)
    init_r: int  # ranknum: the scaling's denominator
    scaling: float  # lora_alpha (init_r when lora_alpha <= 0)
    dropout: float
    fan_in_fan_out: bool  # the weight is stored (in, out) (forced by the layer kind)
    init: str = "default"  # "default" or "random" (PEFT init_lora_weights True / False)


class AdaLoraBranch(Branch):
    """``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r) and ``ranknum`` (1,): the
    initial rank, a frozen parameter as in PEFT (not in the adapter file)."""

    method: ClassVar[str] = "adalora"

    def __init__(
        self,
        lora_A: nn.Parameter,
        lora_E: nn.Parameter,
        lora_B: nn.Parameter,
        ranknum: torch.Tensor,
        *,
        adapter: str,
        target: str,
        scaling: float,
        dropout: float,
        fan_in_fan_out: bool,
    ) -> None:
        super().__init__()
        self.lora_A = lora_A
        self.lora_E = lora_E
        self.lora_B = lora_B
        self.ranknum = FrozenRank(ranknum)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.adapter = adapter
        self.target = target
        self.scaling = scaling
        self.fan_in_fan_out = fan_in_fan_out
        # the kept triplets (rank allocator's, or the spec's rank_pattern); None: all
        self.rank_mask: tuple[bool, ...] | None = None

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The factors, cut to the kept triplets when the rank mask has fewer than the
        branch holds (PEFT's ``resize_state_dict_by_rank_pattern``)."""
        mask = self.rank_mask
        rank = self.lora_E.shape[0]
        if mask is None or sum(mask) == rank or len(mask) != rank:
            yield "lora_A", self.lora_A
            yield "lora_E", self.lora_E
            yield "lora_B", self.lora_B
            return
        keep = torch.tensor(mask, dtype=torch.bool, device=self.lora_E.device)
        yield "lora_A", self.lora_A[keep]
        yield "lora_E", self.lora_E[keep]
        yield "lora_B", self.lora_B[:, keep]

    def delta_weight(self) -> torch.Tensor:
        """``B @ (A⊙E) · s / (ranknum + 1e-5)``: (out, in)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, r={self.lora_E.shape[0]}, "
            f"ranknum={float(self.ranknum)}, scaling={self.scaling:g}"
        )


def _ada(settings: Settings) -> AdaLoraSettings:
    assert isinstance(settings, AdaLoraSettings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> AdaLoraBranch:
    assert isinstance(branch, AdaLoraBranch), type(branch).__name__
    return branch


def adalora_branches(model: nn.Module, adapter: str) -> list[AdaLoraBranch]:
    """The adapter's branches in ``model``, in module order (PEFT's parameter order)."""
    return [m for m in model.modules() if isinstance(m, AdaLoraBranch) and m.adapter == adapter]


class AdaLoraMethod(Method):
    """AdaLoRA: ``x ↦ W₀x + B(E ⊙ A x)·s/(r₀+1e-5)``, ranks allocated while training."""

    name = "adalora"
    title = "AdaLoRA"
    prefix = "lora_"
    branch_type = AdaLoraBranch
    kinds = ("nn.Linear", "transformers.Conv1D")
    default_targets = ADALORA_TARGET_MODULES

    # --- plan ---------------------------------------------------------------------------
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> AdaLoraSettings:
        assert isinstance(spec, AdaLoraAdapter)
        self.check_supported(kind, path)
        r = spec.init_r
        if spec.rank_pattern is not None and path in spec.rank_pattern:
            mask = spec.rank_pattern[path]
            if len(mask) != spec.init_r:
                raise ValueError(
                    f"{path}: rank_pattern has {len(mask)} entries, but init_r is {spec.init_r}"
                )
            r = sum(mask)
        return AdaLoraSettings(
            adapter=adapter,
            target=path,
            r=r,
            init_r=spec.init_r,
            scaling=float(spec.lora_alpha if spec.lora_alpha > 0 else spec.init_r),
            dropout=spec.lora_dropout,
            fan_in_fan_out=kind.transposed(module, spec.fan_in_fan_out),
            init=spec.init,
        )

    def columns(self) -> tuple[str, ...]:
        return ("r",)

    def row(self, settings: Settings) -> tuple[str, ...]:
        s = _ada(settings)
        return (f"{s.r}/{s.init_r}",)

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[AdaLoraBranch, dict[str, torch.Tensor]]:
        s = _ada(settings)
        self.check_supported(kind, s.target)
        fan_in, fan_out = kind.features(module)
        weight = kind.weight(module)
        r = s.r
        if weight.device.type == "meta":
            a = torch.empty(r, fan_in, device="meta")
            e = torch.empty(r, 1, device="meta")
            b = torch.empty(fan_out, r, device="meta")
        else:
            # PEFT's draws, in its order (ranknum's randn(1) too), then its init
            a, e, b = torch.randn(r, fan_in), torch.randn(r, 1), torch.randn(fan_out, r)
            torch.randn(1)
            if s.init == "default":
                nn.init.zeros_(e)
                nn.init.normal_(a, mean=0.0, std=0.02)
                nn.init.normal_(b, mean=0.0, std=0.02)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        device = weight.device if weight.device.type != "meta" else None
        a, e, b = (t.to(device=device, dtype=dtype) for t in (a, e, b))
        ranknum = torch.full((1,), float(s.init_r), dtype=dtype or torch.float32)
        if device is not None:
            ranknum = ranknum.to(device)
        branch = AdaLoraBranch(
            nn.Parameter(a),
            nn.Parameter(e),
            nn.Parameter(b),
            ranknum,
            adapter=s.adapter,
            target=s.target,
            scaling=s.scaling,
            dropout=s.dropout,
            fan_in_fan_out=s.fan_in_fan_out,
        )
        return branch, {}

    def finish(self, model: nn.Module, adapter: str, spec: Any) -> None:
        """Give the model its AdaLoRA state (the rank allocator's) and the forward hook that
        adds ``orth_reg_weight ×`` the orthogonal regulariser to ``output.loss`` (as PEFT's
        ``AdaLoraModel.forward``, whenever the output has a loss)."""
        assert isinstance(spec, AdaLoraAdapter)
        states: dict[str, AdaLoraState] = model.__dict__.setdefault(STATE, {})
        branches = adalora_branches(model, adapter)
        if spec.rank_pattern is not None:
            for branch in branches:
                mask = spec.rank_pattern.get(branch.target)
                if mask is not None:
                    branch.rank_mask = tuple(mask)
        state = AdaLoraState(adapter=adapter, spec=spec)
        states[adapter] = state
        weight = spec.orth_reg_weight

        def add_regulariser(module: nn.Module, args: Any, output: Any) -> Any:
            loss = getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor):
                term = orthogonal_regulariser(adalora_branches(module, adapter))
                output.loss = loss + weight * term
            return output

        state.hook = model.register_forward_hook(add_regulariser)

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
        """``out = current + (dropout(x) @ (A*E).T @ B.T) * s / (ranknum + 1e-5)``.

        After (lora_alpha 8, no dropout)::

            def forward(self, x):
                fc = self.fc(x)
                fc_lora_default_lora_a = self.fc.lora_default.lora_A
                fc_lora_default_lora_e = self.fc.lora_default.lora_E
                mul = fc_lora_default_lora_a * fc_lora_default_lora_e
                t = mul.t()
                matmul = torch.matmul(x, t)
                fc_lora_default_lora_b = self.fc.lora_default.lora_B
                t_1 = fc_lora_default_lora_b.t()
                matmul_1 = torch.matmul(matmul, t_1)
                mul_1 = matmul_1 * 8.0
                fc_lora_default_ranknum = self.fc.lora_default.ranknum
                add = fc_lora_default_ranknum + 1e-05
                truediv = mul_1 / add
                add_1 = fc + truediv
                return add_1
        """
        b = _branch(branch)
        compute = kind.compute_dtype(base)
        own = b.lora_A.dtype
        cast = own != compute
        with graph.inserting_before(current.next):
            h: fx.Node = x
            if cast:
                h = graph.call_method("to", (h, own))
            if b.lora_dropout is not None:
                h = graph.call_module(f"{branch_path}.lora_dropout", (h,))
            a = graph.get_attr(f"{branch_path}.lora_A")
            e = graph.get_attr(f"{branch_path}.lora_E")
            ae = graph.call_function(operator.mul, (a, e))
            h = graph.call_function(torch.matmul, (h, graph.call_method("t", (ae,))))
            bb = graph.get_attr(f"{branch_path}.lora_B")
            h = graph.call_function(torch.matmul, (h, graph.call_method("t", (bb,))))
            h = graph.call_function(operator.mul, (h, b.scaling))
            rank = graph.get_attr(f"{branch_path}.ranknum")
            rank = graph.call_function(operator.add, (rank, 1e-5))
            h = graph.call_function(operator.truediv, (h, rank))
            out = graph.call_function(operator.add, (current, h))
            if cast:
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
        """PEFT's merge: ``W + ΔW`` (ΔW transposed for an (in, out) weight); bias unchanged."""
        b = _branch(branch)
        delta = b.delta_weight().detach()
        if kind.transposed(module, b.fan_in_fan_out):
            delta = delta.T
        return (weight + delta.to(weight.device, weight.dtype)).to(weight.dtype), bias


METHOD = AdaLoraMethod()
