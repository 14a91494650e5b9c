"""IA3 as an adapter method: per-target settings, the ``ia3_l`` branch, its nodes and merge.

Everything here mirrors peft 0.21.2's ``peft/tuners/ia3`` (``layer.py``, ``model.py``):
the vector's shape and dtype, its initialisation (including the random draw PEFT makes
even for ``ones``), the casts of the forward pass and the multiplicative merge.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from adaptc.layers import LayerKind
from adaptc.methods.base import Branch, Method, Settings
from adaptc.methods.common import adapter_dtype, layer_input, set_layer_input
from adaptc.methods.ia3.defaults import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES
from adaptc.methods.ia3.spec import IA3Adapter, NoModules, is_feedforward
from adaptc.spec.fields import NameTargets

__all__ = ["METHOD", "IA3Branch", "IA3Method", "IA3Settings", "adapter_dtype"]

PARAMETER = "ia3_l"  # the branch's parameter: PEFT's key suffix in adapter files
_CONV_KINDS = ("nn.Conv2d", "nn.Conv3d")  # the vector is (1, C, 1, 1[, 1]): channels on dim 1


@dataclass(frozen=True)
class IA3Settings(Settings):
    """One IA3 adapter on one target."""

    adapter: str
    target: str
    feedforward: bool  # scale the layer's input (in_features) instead of its output
    fan_in_fan_out: bool  # the weight is stored (in, out) (forced by the layer kind)
    init: str = "ones"  # "ones" or "random" (PEFT init_ia3_weights True / False)


class IA3Branch(Branch):
    """The vector ``ia3_l`` of one adapter on one target, in PEFT's shape: (out, 1) or, on
    a feed-forward target, (1, in) for linear layers; (1, C, 1, 1[, 1]) for convolutions."""

    method: ClassVar[str] = "ia3"

    def __init__(
        self,
        ia3_l: nn.Parameter,
        *,
        adapter: str,
        target: str,
        feedforward: bool,
        fan_in_fan_out: bool,
        conv: bool,
    ) -> None:
        super().__init__()
        self.ia3_l = ia3_l
        self.adapter = adapter
        self.target = target
        self.feedforward = feedforward
        self.fan_in_fan_out = fan_in_fan_out
        self.conv = conv  # channels on dim 1 (broadcasts over (B, C, *spatial) as it is)

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield PARAMETER, self.ia3_l

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else "output"
        return f"adapter={self.adapter!r}, scales={where}, shape={tuple(self.ia3_l.shape)}"


def _ia3(settings: Settings) -> IA3Settings:
    assert isinstance(settings, IA3Settings), type(settings).__name__
    return settings


def _branch(branch: Branch) -> IA3Branch:
    assert isinstance(branch, IA3Branch), type(branch).__name__
    return branch


class IA3Method(Method):
    """(IA)³: ``x ↦ W₀x·l`` or, feed-forward, ``x ↦ W₀(x·l)``."""

    name = "ia3"
    title = "IA3"
    prefix = "ia3_"
    branch_type = IA3Branch
    kinds = (  # PEFT's IA3Model: its layers, and bitsandbytes' (peft/tuners/ia3/bnb.py)
        "nn.Linear", "transformers.Conv1D", "nn.Conv2d", "nn.Conv3d", "bnb.Linear8bitLt",
        "bnb.Linear4bit",
    )  # fmt: skip
    default_targets = IA3_TARGET_MODULES  # PEFT's, by config.model_type

    # --- model-type defaults (PEFT's _prepare_adapter_config) --------------------------
    def with_defaults(self, spec: Any, model_type: str | None) -> IA3Adapter:
        """``spec`` with an omitted ``feedforward`` set to PEFT's default for the model type
        (as PEFT fills ``feedforward_modules``, whatever the targets); a ValueError when
        there is none, as PEFT raises. Targets are left to the plan's default selector."""
        assert isinstance(spec, IA3Adapter)
        if spec.feedforward is not None:
            return spec
        if not model_type:
            raise ValueError(
                "feedforward is omitted, but the model has no config.model_type to look up "
                "PEFT's default feed-forward modules; set feedforward (e.g. kind: none)"
            )
        default = IA3_FEEDFORWARD_MODULES.get(model_type)
        if default is None:
            raise ValueError(
                "feedforward is omitted, but PEFT has no default feed-forward modules for "
                f"model type {model_type!r}; set feedforward (e.g. kind: none)"
            )
        # not re-validated: PEFT's subset rule does not apply to its defaults
        value = NameTargets(kind="names", names=default) if default else NoModules(kind="none")
        return spec.model_copy(update={"feedforward": value})

    # --- plan ---------------------------------------------------------------------------
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> IA3Settings:
        assert isinstance(spec, IA3Adapter)
        if spec.feedforward is None:
            raise ValueError(
                f"{path}: feedforward is omitted and PEFT's default for the model type was not "
                "resolved (IA3Method.with_defaults); set feedforward (e.g. kind: none)"
            )
        return IA3Settings(
            adapter=adapter,
            target=path,
            feedforward=is_feedforward(spec.feedforward, path),
            fan_in_fan_out=kind.transposed(module, spec.fan_in_fan_out),
            init=spec.init,
        )

    def columns(self) -> tuple[str, ...]:
        return ("feedforward",)

    def row(self, settings: Settings) -> tuple[str, ...]:
        return ("yes" if _ia3(settings).feedforward else "no",)

    # --- compile ------------------------------------------------------------------------
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[IA3Branch, dict[str, torch.Tensor]]:
        s = _ia3(settings)
        self.check_supported(kind, s.target)
        fan_in, fan_out = kind.features(module)
        weight = kind.weight(module)
        features = fan_in if s.feedforward else fan_out
        conv = kind.name in _CONV_KINDS
        if conv:
            shape: tuple[int, ...] = (1, features) + (1,) * (weight.dim() - 2)
        else:
            shape = (1, features) if s.feedforward else (features, 1)
        dtype = adapter_dtype(weight)
        if weight.device.type == "meta":
            data = torch.empty(shape, dtype=dtype, device="meta")
        else:
            # PEFT draws the vector (on the default device) even for `ones`, then casts it to
            # the base dtype and device, then upcasts a half-precision one to float32: the
            # same values, and the same random stream afterwards, under the same seed.
            data = torch.randn(shape)
            if s.init == "ones":
                data.fill_(1.0)
            # (a quantized layer's weight is int8/uint8 to PEFT: the vector stays float32)
            if (weight.dtype.is_floating_point or weight.dtype.is_complex) and not kind.quantized:
                data = data.to(weight.dtype)
            data = data.to(weight.device, dtype)
        branch = IA3Branch(
            nn.Parameter(data),
            adapter=s.adapter,
            target=s.target,
            feedforward=s.feedforward,
            fan_in_fan_out=s.fan_in_fan_out,
            conv=conv,
        )
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
        """Scale the layer's output (``current * l``) or, feed-forward, its input.

        Before::

            def forward(self, x):
                fc = self.fc(x);  x = None
                return fc

        After, output scaling (``ia3_l``: (out, 1); a convolution's (1, out, 1, 1)
        broadcasts as it is, without the ``flatten``)::

            def forward(self, x):
                fc = self.fc(x);  x = None
                fc_ia3_default_ia3_l = self.fc.ia3_default.ia3_l
                flatten = fc_ia3_default_ia3_l.flatten();  fc_ia3_default_ia3_l = None
                mul = fc * flatten;  fc = flatten = None
                return mul

        After, feed-forward (``ia3_l``: (1, in); the layer reads the scaled input)::

            def forward(self, x):
                fc_ia3_default_ia3_l = self.fc.ia3_default.ia3_l
                flatten = fc_ia3_default_ia3_l.flatten();  fc_ia3_default_ia3_l = None
                mul = x * flatten;  x = flatten = None
                fc = self.fc(mul);  mul = None
                return fc

        The casts are PEFT's: on a half-precision layer the float32 vector makes the
        product float32, cast back to the layer's dtype (``.to(torch.float16)``) before the
        layer (feed-forward) or after it. A further adapter on the same layer scales the
        layer's input or output again, as it is then.
        """
        b = _branch(branch)
        compute = kind.compute_dtype(base)
        cast = b.ia3_l.dtype != compute
        # PEFT's bitsandbytes IA3 layers read x as float32 and leave their output in float32,
        # which breaks a bfloat16 model (its attention gets mixed dtypes): the graph casts
        # the output back to the input's dtype (``type_as``; the same in float32)
        back: fx.Node | None = None  # a quantized layer's input, whose dtype comes back
        if kind.quantized:
            back = layer_input(call)
            with graph.inserting_before(call):
                set_layer_input(call, graph.call_method("to", (back, torch.float32)))
            cast = False

        def vector() -> fx.Node:
            node = graph.get_attr(f"{branch_path}.{PARAMETER}")
            return node if b.conv else graph.call_method("flatten", (node,))

        if b.feedforward:
            with graph.inserting_before(call):
                scaled = graph.call_function(operator.mul, (layer_input(call), vector()))
                if cast:
                    scaled = graph.call_method("to", (scaled, compute))
            set_layer_input(call, scaled)
            if back is None:
                return current
            with graph.inserting_before(current.next):
                return graph.call_method("type_as", (current, back))
        with graph.inserting_before(current.next):
            out = graph.call_function(operator.mul, (current, vector()))
            if cast:
                out = graph.call_method("to", (out, compute))
            if back is not None:
                out = graph.call_method("type_as", (out, back))
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
        """PEFT's merge: the weight times the vector along its feature axis, and (output
        scaling only) the bias times the vector; both back in their own dtype."""
        b = _branch(branch)
        vec = b.ia3_l.detach()
        if b.conv:
            scale = _conv_scale(module, vec, feedforward=b.feedforward)
            bias_dtype = weight.dtype  # (PEFT casts a convolution's bias to the weight's dtype)
        else:
            scale = vec.T if kind.transposed(module, b.fan_in_fan_out) else vec
            bias_dtype = bias.dtype if bias is not None else weight.dtype
        new_weight = torch.mul(weight, scale).to(weight.dtype)
        if b.feedforward or bias is None:
            return new_weight, bias
        return new_weight, torch.mul(bias, vec.reshape(bias.shape)).to(bias_dtype)


def _conv_scale(module: nn.Module, vec: torch.Tensor, *, feedforward: bool) -> torch.Tensor:
    """The vector in the shape of a convolution's weight (out, in/groups, *kernel)."""
    if not feedforward:
        return vec.transpose(0, 1)  # (out, 1, 1, 1)
    groups = int(getattr(module, "groups", 1))
    if groups == 1:
        return vec  # (1, in, 1, 1)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    out_channels, in_per_group = int(weight.shape[0]), int(weight.shape[1])
    spatial = vec.shape[2:]
    per_group = vec.reshape(groups, 1, in_per_group, *spatial)
    per_group = per_group.expand(groups, out_channels // groups, in_per_group, *spatial)
    return per_group.reshape(out_channels, in_per_group, *spatial)


METHOD = IA3Method()
