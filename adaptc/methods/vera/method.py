"""VeRA as an adapter method: per-target settings, the ``vera_lambda_`` branch, its nodes
and merge, and the frozen random projections one adapter's branches share.

Everything here mirrors peft 0.21.2's ``peft/tuners/vera`` (``layer.py``, ``model.py``):
``x ↦ W₀x + b ⊙ B[:out] (d ⊙ A[:, :in] x)``, where ``A`` (r, in_max) and ``B`` (out_max, r)
are drawn once per adapter (Kaiming uniform from a CPU generator seeded with
``projection_prng_key``; ``A`` first), sized for the largest input and output among the
adapter's targets, and sliced per layer. Every branch of an adapter holds the *same*
two tensors (buffers: frozen, not counted as parameters); :meth:`VeraMethod.finish` and
:meth:`Branch.model_file_tensors` make them one pair in the model and in the file.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.layers import LayerKind, find_kind
from adaptc.methods.base import Branch, Companions, Method, Settings
from adaptc.methods.common import LoraDefaultTargets, adapter_dtype
from adaptc.methods.vera.spec import VeraAdapter

__all__ = ["METHOD", "VeraBranch", "VeraMethod", "VeraSettings", "adapter_dtype", "projections"]

_FILE_PREFIX = "base_model."  # PEFT keeps the shared projections beside the model's keys


@dataclass(frozen=True)
class VeraSettings(Settings):
    """One VeRA adapter on one target."""

    adapter: str
    target: str
    r: int
    projection: tuple[int, int]  # (out_max, in_max): the shared B's rows, A's columns
    key: int  # projection_prng_key
    save_projection: bool
    dropout: float
    d_initial: float
    fan_in_fan_out: bool  # the weight is stored (in, out) (forced by the layer kind)
    init: str = "default"  # "default" or "random" (PEFT init_weights True / False)


class VeraBranch(Branch):
    """``vera_lambda_b`` (out) and ``vera_lambda_d`` (r) of one adapter on one target, and the
    adapter's shared projections ``vera_A`` (r, in_max) and ``vera_B`` (out_max, r)."""

    method: ClassVar[str] = "vera"
    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(
        self,
        lambda_b: nn.Parameter,
        lambda_d: nn.Parameter,
        vera_A: torch.Tensor,
        vera_B: torch.Tensor,
        *,
        adapter: str,
        target: str,
        in_features: int,
        out_features: int,
        dropout: float,
        fan_in_fan_out: bool,
        save_projection: bool,
    ) -> None:
        super().__init__()
        self.vera_lambda_b = lambda_b
        self.vera_lambda_d = lambda_d
        self.register_buffer("vera_A", vera_A, persistent=save_projection)
        self.register_buffer("vera_B", vera_B, persistent=save_projection)
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.adapter = adapter
        self.target = target
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.save_projection = save_projection

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "vera_lambda_b", self.vera_lambda_b
        yield "vera_lambda_d", self.vera_lambda_d

    def model_file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """PEFT's ``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection``."""
        if self.save_projection:
            yield f"{_FILE_PREFIX}vera_A", self.vera_A
            yield f"{_FILE_PREFIX}vera_B", self.vera_B

    def delta_weight(self) -> torch.Tensor:
        """``(b ⊙ B[:out]) @ (d ⊙ A[:, :in])``: (out, in), float32 for a half-precision
        branch (PEFT's CPU rule; the caller casts back)."""
        a = self.vera_A[:, : self.in_features]  # (r, in)
        b = self.vera_B[: self.out_features, :]  # (out, r)
        lb: torch.Tensor = self.vera_lambda_b
        ld: torch.Tensor = self.vera_lambda_d
        if b.dtype in (torch.float16, torch.bfloat16):
            a, b, lb, ld = a.float(), b.float(), lb.float(), ld.float()
        return (lb.unsqueeze(-1) * b) @ (ld.unsqueeze(-1) * a)

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, r={self.vera_lambda_d.shape[0]}, "
            f"in={self.in_features}, out={self.out_features}"
        )


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: uniform in ±sqrt(3)·sqrt(2)/sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, projection: tuple[int, int], key: int) -> tuple[torch.Tensor, ...]:
    """``(vera_A (r, in_max), vera_B (out_max, r))`` as PEFT draws them from ``key``."""
    out_max, in_max = projection
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = _kaiming((r, in_max), generator)
    return vera_a, _kaiming((out_max, r), generator)


def _vera(settings: Settings) -> VeraSettings:
    assert isinstance(settings, VeraSettings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> VeraBranch:
    assert isinstance(branch, VeraBranch), type(branch).__name__
    return branch


class VeraMethod(Method):
    """VeRA: ``x ↦ W₀x + b ⊙ B(d ⊙ A x)`` with ``A``, ``B`` shared, frozen and random."""

    name = "vera"
    title = "VeRA"
    prefix = "vera_lambda_"
    branch_type = VeraBranch
    kinds = ("nn.Linear", "transformers.Conv1D")  # PEFT's VeraModel (no convolutions)
    # PEFT's, by config.model_type: LoRA's table, with its own entry for phi
    default_targets = LoraDefaultTargets({"phi": ("q_proj", "v_proj")})

    # --- plan ---------------------------------------------------------------------------
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> VeraSettings:
        assert isinstance(spec, VeraAdapter)
        self.check_supported(kind, path)
        fan_in, fan_out = kind.features(module)
        return VeraSettings(
            adapter=adapter,
            target=path,
            r=spec.r,
            projection=(fan_out, fan_in),  # widened to the adapter's largest by companions()
            key=spec.projection_prng_key,
            save_projection=spec.save_projection,
            dropout=spec.vera_dropout,
            d_initial=spec.d_initial,
            fan_in_fan_out=kind.transposed(module, spec.fan_in_fan_out),
            init=spec.init,
        )

    def companions(
        self, model: nn.Module, spec: Any, adapter: str, targets: tuple[str, ...]
    ) -> Companions:
        """Every target again, its ``projection`` the largest (out, in) among all of them
        (PEFT's ``_find_dim``): the shared ``vera_A``/``vera_B`` are sized for it."""
        found: list[tuple[Any, Any, Any, Settings]] = []
        for path in targets:
            module = model.get_submodule(path)
            kind = find_kind(module)
            assert kind is not None, path
            found.append((path, kind, module, self.settings(kind, module, path, adapter, spec)))
        if not found:
            return Companions()
        out_max = max(_vera(s).projection[0] for *_, s in found)
        in_max = max(_vera(s).projection[1] for *_, s in found)
        return Companions(
            tuple(
                (self, path, replace(_vera(s), projection=(out_max, in_max)))
                for path, _, _, s in found
            )
        )

    def columns(self) -> tuple[str, ...]:
        return ("projection",)

    def row(self, settings: Settings) -> tuple[str, ...]:
        out_max, in_max = _vera(settings).projection
        return (f"{_vera(settings).r}x{in_max}, {out_max}x{_vera(settings).r}",)

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[VeraBranch, dict[str, torch.Tensor]]:
        s = _vera(settings)
        self.check_supported(kind, s.target)
        fan_in, fan_out = kind.features(module)
        weight = kind.weight(module)
        out_max, in_max = s.projection
        if weight.device.type == "meta":
            lambda_b = torch.empty(fan_out, device="meta")
            lambda_d = torch.empty(s.r, device="meta")
            vera_a = torch.empty(s.r, in_max, device="meta")
            vera_b = torch.empty(out_max, s.r, device="meta")
        else:
            # PEFT: b ones, d drawn from the global generator (even when then filled)
            lambda_b, lambda_d = torch.ones(fan_out), torch.randn(s.r)
            if s.init == "default":
                lambda_d.fill_(s.d_initial)
                lambda_b.zero_()
            vera_a, vera_b = projections(s.r, s.projection, s.key)
        # PEFT moves them to the base's device and dtype, then upcasts a half-precision one
        # to float32: the values are rounded through the base dtype
        dtype = adapter_dtype(weight)
        base_dtype = weight.dtype if weight.dtype.is_floating_point else dtype
        tensors = [
            t.to(weight.device, base_dtype).to(dtype) for t in (lambda_b, lambda_d, vera_a, vera_b)
        ]
        branch = VeraBranch(
            nn.Parameter(tensors[0]),
            nn.Parameter(tensors[1]),
            tensors[2],
            tensors[3],
            adapter=s.adapter,
            target=s.target,
            in_features=fan_in,
            out_features=fan_out,
            dropout=s.dropout,
            fan_in_fan_out=s.fan_in_fan_out,
            save_projection=s.save_projection,
        )
        return branch, {}

    def finish(self, model: nn.Module, adapter: str, spec: Any) -> None:
        """Make every branch of ``adapter`` hold the same ``vera_A``/``vera_B`` (the first
        branch's), as PEFT's layers share one ``BufferDict`` entry."""
        first: VeraBranch | None = None
        for module in model.modules():
            if not isinstance(module, VeraBranch) or module.adapter != adapter:
                continue
            if first is None:
                first = module
            elif module.vera_A is not first.vera_A:
                module.vera_A = first.vera_A
                module.vera_B = first.vera_B

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
        """``out = current + b * linear(d * linear(dropout(x), A[:, :in]), B[:out])``.

        Before::

            def forward(self, x):
                fc = self.fc(x);  x = None
                return fc

        After (in = 16, out = 32, no dropout)::

            def forward(self, x):
                fc = self.fc(x)
                fc_vera_lambda_default_vera_a = self.fc.vera_lambda_default.vera_A
                getitem = fc_vera_lambda_default_vera_a[(slice(None, None, None), slice(None, 16, None))]
                fc_vera_lambda_default_vera_b = self.fc.vera_lambda_default.vera_B
                getitem_1 = fc_vera_lambda_default_vera_b[(slice(None, 32, None), slice(None, None, None))]
                linear = torch._C._nn.linear(x, getitem);  x = getitem = None
                fc_vera_lambda_default_vera_lambda_d = self.fc.vera_lambda_default.vera_lambda_d
                mul = fc_vera_lambda_default_vera_lambda_d * linear
                linear_1 = torch._C._nn.linear(mul, getitem_1)
                fc_vera_lambda_default_vera_lambda_b = self.fc.vera_lambda_default.vera_lambda_b
                mul_1 = fc_vera_lambda_default_vera_lambda_b * linear_1
                add = fc + mul_1
                return add

        The casts are PEFT's: the input to the vectors' dtype, the sum back to the layer's.
        """  # noqa: E501
        b = _branch(branch)
        compute = kind.compute_dtype(base)
        own = b.vera_lambda_d.dtype
        with graph.inserting_before(current.next):
            vera_a = graph.get_attr(f"{branch_path}.vera_A")
            sliced_a = graph.call_function(
                operator.getitem, (vera_a, (slice(None), slice(None, b.in_features)))
            )  # (r, in)
            vera_b = graph.get_attr(f"{branch_path}.vera_B")
            sliced_b = graph.call_function(
                operator.getitem, (vera_b, (slice(None, b.out_features), slice(None)))
            )  # (out, r)
            h: fx.Node = x
            if own != compute:
                h = graph.call_method("to", (h, own))
            if b.vera_dropout is not None:
                h = graph.call_module(f"{branch_path}.vera_dropout", (h,))
            h = graph.call_function(F.linear, (h, sliced_a))  # (..., r)
            lambda_d = graph.get_attr(f"{branch_path}.vera_lambda_d")
            h = graph.call_function(operator.mul, (lambda_d, h))
            h = graph.call_function(F.linear, (h, sliced_b))  # (..., out)
            lambda_b = graph.get_attr(f"{branch_path}.vera_lambda_b")
            h = graph.call_function(operator.mul, (lambda_b, h))
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
        """PEFT's merge: ``W + ΔW`` (ΔW transposed for an (in, out) weight); bias unchanged."""
        b = _branch(branch)
        delta = b.delta_weight().detach()
        if kind.transposed(module, b.fan_in_fan_out):
            delta = delta.T
        return (weight + delta.to(weight.device)).to(weight.dtype), bias


METHOD = VeraMethod()
