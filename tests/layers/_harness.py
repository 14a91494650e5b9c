"""A one-layer compiler and its PEFT twin, for parity tests of the layer rules.

``compile_layer`` does what the compiler does for one target: trace a wrapper with the layer
as a leaf ``call_module`` node, build the branch with LoRA's rule for the layer's kind,
register it under the layer as ``lora_default``, and emit the branches with the
compiler's own pass (:func:`adaptc.compiler.passes.emit_branches`), then recompile.
``peft_layer`` wraps the same layer with the real ``peft`` package. ``opts`` are PEFT's
``LoraConfig`` keywords, translated for adaptc by ``branch_config``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import fx, nn
from transformers.pytorch_utils import Conv1D

from adaptc.compiler.passes import emit_branches
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.method import rule_for
from adaptc.methods.lora.rule import BranchConfig, LoraRule


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # type: ignore[no-any-return]


class ScaledEmbedding(nn.Embedding):
    """Gemma 3's ``TextScaledWordEmbedding`` in small: ``embed(x) · embed_scale``."""

    def __init__(self, num: int, dim: int, scale: float, *, buffer: bool = True) -> None:
        super().__init__(num, dim)
        if buffer:
            self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)
        else:
            self.embed_scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.embed_scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(self.weight.dtype)
        return super().forward(x) * scale


@dataclass(frozen=True)
class Case:
    """A layer and an input for it (built fresh, from a seed, on each call)."""

    name: str
    layer: Callable[[], nn.Module]
    input: Callable[[], torch.Tensor]
    r: int = 4
    mergeable: bool = True  # PEFT can compute the delta weight and merge
    bias: bool = True  # the base layer has a bias (lora_bias makes sense)
    linear: bool = True  # the layer is linear in its weight, so a merge keeps its output

    def __str__(self) -> str:
        return self.name


def ids(num: int, *shape: int, pad: int | None = None) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        x = torch.randint(0, num, shape)
        if pad is not None:
            x[..., 0] = pad
        return x

    return make


def _randn(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape)


CASES = [
    Case("linear", lambda: nn.Linear(8, 6), _randn(3, 8)),
    Case("linear-nobias", lambda: nn.Linear(8, 6, bias=False), _randn(2, 3, 8), bias=False),
    Case("conv1D", lambda: Conv1D(6, 8), _randn(2, 3, 8)),
    Case("embedding", lambda: nn.Embedding(12, 6), ids(12, 2, 5), bias=False),
    Case(
        "embedding-pad",
        lambda: nn.Embedding(12, 6, padding_idx=0),
        ids(12, 2, 5, pad=0),
        bias=False,
    ),
    Case(
        "embedding-maxnorm",
        lambda: nn.Embedding(12, 6, max_norm=1.0),
        ids(12, 9),
        bias=False,
        linear=False,
    ),
    Case("embedding-scaled", lambda: ScaledEmbedding(12, 6, 2.5), ids(12, 2, 5), bias=False),
    Case("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), _randn(2, 4, 10)),
    Case("conv1d-stride", lambda: nn.Conv1d(4, 6, 5, stride=2), _randn(2, 4, 11)),
    Case("conv2d-1x1", lambda: nn.Conv2d(4, 6, 1), _randn(2, 4, 5, 5)),
    Case("conv2d-3x3", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), _randn(2, 4, 7, 7)),
    Case("conv2d-3x1", lambda: nn.Conv2d(4, 6, (3, 1), padding=(1, 0)), _randn(2, 4, 5, 6)),
    Case(
        "conv2d-same",
        lambda: nn.Conv2d(4, 6, 3, padding="same", bias=False),
        _randn(1, 4, 6, 6),
        bias=False,
    ),
    Case(
        "conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2), _randn(2, 4, 5, 5), mergeable=False
    ),
    Case("conv3d", lambda: nn.Conv3d(3, 4, 3, padding=1), _randn(1, 3, 4, 5, 5)),
    # PEFT's get_delta_weight fails on these kernels: adaptc uses the general formula
    Case("conv3d-1x1x1", lambda: nn.Conv3d(3, 4, 1), _randn(1, 3, 3, 4, 4), mergeable=False),
]
CASE = {c.name: c for c in CASES}


def branch_config(layer: nn.Module, **opts: Any) -> BranchConfig:
    """adaptc's BranchConfig for PEFT's LoraConfig keywords ``opts``."""
    r, alpha = opts.get("r", 8), opts.get("lora_alpha", 8)
    init = opts.get("init_lora_weights", True)
    niter = None
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        niter, init = int(init.removeprefix("pissa_niter_")), "pissa"
    init = {True: "default", False: "random"}.get(init, init)
    rule = rule_for(layer)
    assert rule is not None
    return BranchConfig(
        adapter="default",
        target="layer",
        r=r,
        lora_alpha=alpha,
        scaling=alpha / math.sqrt(r) if opts.get("use_rslora") else alpha / r,
        lora_dropout=opts.get("lora_dropout", 0.0),
        variant="dora" if opts.get("use_dora", False) else None,
        init=init,
        pissa_niter=niter,
        lora_bias=opts.get("lora_bias", False),
        fan_in_fan_out=rule.fan_in_fan_out(layer, False),
    )


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return m is self.leaf or super().is_leaf_module(m, qualified_name)


@dataclass
class Compiled:
    gm: fx.GraphModule
    rule: LoraRule
    branch: LoraBranch
    replaced: dict[str, torch.Tensor]
    base_graph: fx.Graph  # the traced graph, without branches

    def emit(self, active: list[str]) -> None:
        """The compiler's pass: the base graph with the branches of ``active``."""
        graph = copy.deepcopy(self.base_graph)
        emit_branches(graph, self.gm, active)
        self.gm.graph = graph
        self.gm.recompile()

    @property
    def layer(self) -> nn.Module:
        return self.gm.get_submodule("layer")


def compile_layer(layer: nn.Module, **opts: Any) -> Compiled:
    """The compiler's rewrite of ``Wrap(layer)`` (``layer`` itself is left alone)."""
    wrap = Wrap(copy.deepcopy(layer))
    graph = _LeafTracer(wrap.layer).trace(wrap)
    gm = fx.GraphModule(wrap, graph)
    base = gm.get_submodule("layer")
    rule = rule_for(base)
    assert rule is not None
    cfg = branch_config(base, **opts)
    rule.check(base, cfg)
    branch, replaced = rule.make_branch(base, cfg)
    for name, tensor in replaced.items():
        base._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    base.add_module("lora_default", branch)
    compiled = Compiled(gm, rule, branch, replaced, copy.deepcopy(graph))
    compiled.emit(["default"])
    return compiled


def peft_layer(layer: nn.Module, **opts: Any) -> tuple[peft.PeftModel, nn.Module]:
    """``Wrap(copy of layer)`` adapted by PEFT, and PEFT's LoRA layer in it."""
    model = peft.get_peft_model(
        Wrap(copy.deepcopy(layer)), peft.LoraConfig(target_modules=["layer"], **opts)
    )
    return model, model.base_model.model.layer


def peft_key(name: str, adapter: str = "default") -> str:
    """A PEFT layer parameter's name as adapter files store it (and adaptc names it)."""
    name = name.replace(f".{adapter}", "")
    return name.removesuffix(".weight") if name.startswith("lora_magnitude_vector") else name


def adapter_params(module: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """PEFT's parameters of one adapter of one LoRA layer, by file key."""
    return {
        peft_key(n, adapter): p
        for n, p in module.named_parameters()
        if n.startswith("lora_") and (f".{adapter}." in n or n.endswith(f".{adapter}"))
    }


@torch.no_grad()
def randomise(peft_module: nn.Module, seed: int = 1, adapter: str = "default") -> None:
    """Non-zero factors and a magnitude away from the weight norm, so every term counts."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in adapter_params(peft_module, adapter).items():
        noise = torch.randn(p.shape, generator=gen).to(p.dtype)
        if name == "lora_magnitude_vector":
            p.mul_(1 + 0.2 * noise)
        else:
            p.copy_(0.3 * noise)


@torch.no_grad()
def load_from_peft(branch: LoraBranch, peft_module: nn.Module, adapter: str = "default") -> None:
    """Copy PEFT's adapter tensors into ``branch``; the names must match exactly."""
    params = adapter_params(peft_module, adapter)
    assert sorted(params) == sorted(k for k, _ in branch.named_parameters())
    branch.load_state_dict({k: p.detach().clone() for k, p in params.items()}, strict=True)


def adapt_both(
    case: Case, seed: int = 0, dtype: torch.dtype | None = None, **opts: Any
) -> tuple[Compiled, peft.PeftModel, nn.Module]:
    """The same layer adapted by adaptc and by PEFT, with PEFT's random adapter in both."""
    torch.manual_seed(seed)
    layer = case.layer()
    if dtype is not None:
        layer = layer.to(dtype)
    ours = compile_layer(layer, **opts)
    model, module = peft_layer(layer, **opts)
    randomise(module, seed + 1)
    load_from_peft(ours.branch, module)
    return ours, model, module


def stack_second_adapter(
    ours: Compiled, model: peft.PeftModel, module: nn.Module, **opts: Any
) -> LoraBranch:
    """Add adapter ``second`` on both sides, fed by the first branch's output; both active."""
    model.add_adapter("second", peft.LoraConfig(target_modules=["layer"], **opts))
    model.base_model.set_adapter(["default", "second"])
    randomise(module, 7, "second")
    cfg = dataclasses.replace(branch_config(ours.layer, **opts), adapter="second")
    branch, _ = ours.rule.make_branch(ours.layer, cfg)
    load_from_peft(branch, module, "second")
    ours.layer.add_module("lora_second", branch)
    ours.emit(["default", "second"])
    return branch
