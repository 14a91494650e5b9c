"""``nn.MultiheadAttention``: LoRA on the fused input projection and on ``out_proj`` (PEFT's
``lora.MultiheadAttention``).

The layer computes its projections from parameters, not by calling linear layers, so the
update goes into the weights it attends with::

    in_proj_weight'  = W_in + s·B·A                  A: (r, E), B: (3E, r)
    out_proj.weight' = W_out + s·B_o·A_o + s·B_o·A_o  A_o: (r, E), B_o: (E, r)

and the layer runs with those weights (``torch.func.functional_call``: the module stays
a leaf of the graph, its own parameters are never written). ``lora_A``/``lora_B`` hang
under the branch, ``out_proj.lora_A``/``out_proj.lora_B`` under its ``out_proj`` child;
files name the latter ``base_layer.out_proj.lora_A.weight`` as PEFT does. As in PEFT
0.21.2:

* the ``out_proj`` update counts twice, in the forward and in a merge, and the second time
  it is detached (PEFT adds ``s·B_o·A_o`` to the merged weight and then merges its nested
  ``lora.Linear`` again through ``.data``; peft PR 3774 proposes to add it once): the
  gradients are those of a single update;
* no dropout is ever applied (``lora_dropout`` is ignored, with a warning);
* the result is cast to the query's dtype; the updates are cast to the layer's dtype
  before they are added.

Refused, where PEFT refuses or computes something inconsistent: DoRA (PEFT: "does not
support DoRA"), query/key/value of different sizes, inits other than ``default``, ``gaussian`` and
``random`` (PEFT fails on PiSSA, OLoRA and orthogonal: the layer has no ``weight``),
``lora_bias`` (PEFT allocates the biases but never trains them: the input
projection's is unused, the output projection's is added through ``.data``) and bias
modes other than ``none`` (PEFT trains ``out_proj``'s bias but not ``in_proj_bias``).
Combining adapters, hotswapping and mixed batches need one (A, B) pair per branch and
refuse this one (:meth:`MultiheadAttentionBranch.factors`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call

from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.init import init_factors
from adaptc.methods.lora.rule import (
    BranchConfig,
    LoraRule,
    Merged,
    adapter_dtype,
    round_as_peft,
)
from adaptc.methods.lora.variants import variant_title

__all__ = ["MultiheadAttentionBranch", "MultiheadAttentionRule", "adapted_attention"]

OUT_PROJ = "out_proj"  # the branch's child holding out_proj's factors
FILE_OUT_PROJ = "base_layer.out_proj."  # their prefix in adapter files (PEFT's)
_INITS = ("default", "gaussian", "random")  # the inits PEFT can give this layer


class OutProjFactors(nn.Module):
    """``out_proj``'s factors: ``lora_A``: E → r, ``lora_B``: r → E."""

    def __init__(self, lora_A: nn.Linear, lora_B: nn.Linear) -> None:
        super().__init__()
        self.lora_A = lora_A
        self.lora_B = lora_B


class MultiheadAttentionBranch(LoraBranch):
    """LoRA on ``in_proj_weight`` (``lora_A``/``lora_B``) and on ``out_proj`` (``out_proj``)."""

    def __init__(
        self,
        in_proj: tuple[nn.Linear, nn.Linear],
        out_proj: tuple[nn.Linear, nn.Linear],
        cfg: BranchConfig,
    ) -> None:
        super().__init__(
            *in_proj, scaling=cfg.scaling, dropout=0.0, adapter=cfg.adapter, target=cfg.target,
            r=cfg.r, lora_alpha=cfg.lora_alpha,
        )  # fmt: skip
        self.out_proj = OutProjFactors(*out_proj)

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·B·A, s·B_o·A_o)``: (3E, E) and (E, E), in the adapter's dtype."""
        out_proj = self.out_proj
        assert isinstance(out_proj, OutProjFactors)
        return _delta(self.lora_A, self.lora_B, self.scaling), _delta(
            out_proj.lora_A, out_proj.lora_B, self.scaling
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            f"{self.target}: a LoRA branch of an nn.MultiheadAttention changes the layer's "
            "weights; the graph computes it (see adaptc.methods.lora.mha)"
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(
            f"{self.target}: LoRA on nn.MultiheadAttention has two factor pairs (in_proj and "
            "out_proj), not one; combining adapters, hotswapping and mixed batches do not "
            "support it"
        )

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.r == 0:
            return
        for name, param in self.named_parameters():
            if name.startswith(f"{OUT_PROJ}."):
                name = FILE_OUT_PROJ + name.removeprefix(f"{OUT_PROJ}.")
            yield name, param


def _delta(lora_A: nn.Module, lora_B: nn.Module, scaling: float) -> torch.Tensor:
    A, B = lora_A.weight, lora_B.weight
    assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
    return (B @ A) * scaling  # PEFT's get_delta_weight


def adapted_attention(
    layer: nn.Module,
    in_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    /,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer(*args, **kwargs)`` with these two weights in place of its own, the outputs
    cast to the query's dtype (PEFT's cast).

    Called with fx proxies (fx traces the generated code again, e.g. when a graph module is
    unpickled), it records itself as one node, as it was emitted."""
    proxy = next((a for a in (in_proj_weight, *args) if isinstance(a, fx.Proxy)), None)
    if proxy is not None:
        call = (layer, in_proj_weight, out_proj_weight, *args)
        return proxy.tracer.create_proxy("call_function", adapted_attention, call, kwargs)  # type: ignore[return-value]
    query = args[0] if args else kwargs["query"]
    weights = {"in_proj_weight": in_proj_weight, f"{OUT_PROJ}.weight": out_proj_weight}
    out, attn = functional_call(layer, weights, args, kwargs)
    dtype = query.dtype
    return out.to(dtype), None if attn is None else attn.to(dtype)


class MultiheadAttentionRule(LoraRule):
    """See the module docstring."""

    batch_form = "attention"  # no mixed-batch kernel: mixed batches refuse it

    def check(self, module: nn.Module, cfg: BranchConfig) -> list[str]:
        self.refuse(module, cfg)
        fan_in, _ = self.features(module)
        warnings = []
        if cfg.r > fan_in:
            warnings.append(
                f"{cfg.target}: r={cfg.r} exceeds embed_dim = {fan_in}; the update cannot "
                "use the extra rank"
            )
        if cfg.lora_dropout > 0:
            warnings.append(
                f"{cfg.target}: lora_dropout is not applied to nn.MultiheadAttention "
                "(nor by PEFT, which merges the update into the weights)"
            )
        return warnings

    def refuse(self, module: nn.Module, cfg: BranchConfig) -> None:
        where = f"{cfg.target}: nn.MultiheadAttention"
        if not getattr(module, "_qkv_same_embed_dim", True):
            raise ValueError(
                f"{where} has query/key/value of different sizes (kdim/vdim); only one size "
                "is supported (as in PEFT)"
            )
        if cfg.variant is not None:
            raise ValueError(
                f"{where} does not support {variant_title(cfg.variant)} (PEFT neither); "
                "set use_dora to false"
            )
        if cfg.init not in _INITS:
            raise ValueError(
                f"{where} does not support init {cfg.init!r} (PEFT fails on it: the layer has "
                f"no single weight); use {', '.join(_INITS)}"
            )
        if cfg.lora_bias:
            raise ValueError(
                f"{where} does not support lora_bias (PEFT allocates the biases but never "
                "trains them); set lora_bias to false"
            )
        if cfg.bias != "none":
            raise ValueError(
                f"{where} does not support bias {cfg.bias!r} (PEFT trains out_proj's bias but "
                "not in_proj_bias); use bias 'none'"
            )

    def make_plain_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        assert isinstance(module, nn.MultiheadAttention)
        weight = module.in_proj_weight
        E = module.embed_dim
        kw: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        draws = weight.device.type != "meta"
        # PEFT builds out_proj's factors, then in_proj's, then out_proj's again (the first
        # ones are dropped): the same draws give the same adapter weights as peft
        if draws:
            _factor_pair(E, E, cfg, kw, draws)
        in_proj = _factor_pair(E, 3 * E, cfg, kw, draws)
        out_proj = _factor_pair(E, E, cfg, kw, draws)
        round_as_peft(weight.dtype, *(f.weight for f in (*in_proj, *out_proj)))
        return MultiheadAttentionBranch(in_proj, out_proj, cfg), {}

    def emit_plain(
        self,
        graph: fx.Graph,
        x: fx.Node,
        base_out: fx.Node,
        *,
        base: nn.Module,
        base_path: str,
        branch: LoraBranch,
        branch_path: str,
    ) -> fx.Node:
        """Replace the layer's call by :func:`adapted_attention` with the updated weights (the
        call is erased, its users rewired); a further adapter adds its updates to them.
        Returns the new call.

        Before::

            def forward(self, x):
                attn = self.attn(x, x, x);  x = None
                getitem = attn[0];  attn = None
                return getitem

        After (r = 2, lora_alpha = 4: s = 2; names shortened)::

            def forward(self, x):
                attn_in_proj_weight = self.attn.in_proj_weight
                attn_out_proj_weight = self.attn.out_proj.weight
                a = self.attn.lora_default.lora_A.weight
                b = self.attn.lora_default.lora_B.weight
                matmul = b @ a;  b = a = None
                mul = matmul * 2.0;  matmul = None
                add = attn_in_proj_weight + mul;  attn_in_proj_weight = mul = None
                a_o = self.attn.lora_default.out_proj.lora_A.weight
                b_o = self.attn.lora_default.out_proj.lora_B.weight
                matmul_1 = b_o @ a_o;  b_o = a_o = None
                mul_1 = matmul_1 * 2.0;  matmul_1 = None
                add_1 = attn_out_proj_weight + mul_1;  attn_out_proj_weight = None
                detach = mul_1.detach();  mul_1 = None
                add_2 = add_1 + detach;  add_1 = detach = None
                attn_1 = self.attn
                adapted_attention = adaptc_methods_lora_mha_adapted_attention(
                    attn_1, add, add_2, x, x, x);  attn_1 = add = add_2 = x = None
                getitem = adapted_attention[0];  adapted_attention = None
                return getitem

        The casts to the layer's dtype (``.to(torch.bfloat16)``) appear only when the
        adapter's dtype differs.
        """
        assert isinstance(branch, MultiheadAttentionBranch)
        first = not _is_adapted(base_out)
        assert not first or base_out.op == "call_module", base_out.format_node()
        dtype = self.kind.compute_dtype(base)
        with graph.inserting_before(base_out):
            if first:
                in_w: Any = graph.get_attr(f"{base_path}.in_proj_weight")
                out_w: Any = graph.get_attr(f"{base_path}.{OUT_PROJ}.weight")
            else:
                in_w, out_w = base_out.args[1], base_out.args[2]
            delta = _emit_delta(graph, branch_path, branch.scaling)
            in_w = graph.call_function(operator.add, (in_w, _cast(graph, delta, dtype, branch)))
            delta = _emit_delta(graph, f"{branch_path}.{OUT_PROJ}", branch.scaling)
            out_w = graph.call_function(operator.add, (out_w, _cast(graph, delta, dtype, branch)))
            again = graph.call_function(
                operator.add, (out_w, graph.call_method("detach", (delta,)))
            )
            out_w = _cast(graph, again, dtype, branch)
            if not first:
                base_out.update_arg(1, in_w)
                base_out.update_arg(2, out_w)
                return base_out
            layer = graph.get_attr(base_path)
            call = graph.call_function(
                adapted_attention, (layer, in_w, out_w, *base_out.args), dict(base_out.kwargs)
            )
        # the layer's own call would compute the attention a second time, for nothing
        base_out.replace_all_uses_with(call)
        graph.erase_node(base_out)
        return call

    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        """The update of the (4E, E) weight the kind reads: ``s·B·A`` on ``2·s·B_o·A_o``."""
        assert isinstance(branch, MultiheadAttentionBranch)
        d_in, d_out = branch.deltas()
        return torch.cat([d_in, 2 * d_out])

    def merge_plain(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        """PEFT's merged weights, with its order of additions and casts."""
        assert isinstance(branch, MultiheadAttentionBranch)
        assert isinstance(module, nn.MultiheadAttention)
        rows = 3 * module.embed_dim
        d_in, d_out = branch.deltas()
        w_in = weight[:rows] + d_in.to(weight.dtype)
        w_out = weight[rows:] + d_out.to(weight.dtype)
        w_out = (w_out + d_out).to(weight.dtype)  # PEFT's second, in-place addition
        return Merged(torch.cat([w_in, w_out]))


def _factor_pair(
    fan_in: int, fan_out: int, cfg: BranchConfig, kw: dict[str, Any], draws: bool
) -> tuple[nn.Linear, nn.Linear]:
    """``lora_A``: fan_in → r and ``lora_B``: r → fan_out, built and initialised as PEFT's
    ``update_layer`` does (``random``: the layers' own init, PEFT's False)."""
    lora_A = nn.Linear(fan_in, cfg.r, bias=False, **kw)
    lora_B = nn.Linear(cfg.r, fan_out, bias=False, **kw)
    if draws and cfg.init != "random":
        init_factors(lora_A.weight, lora_B.weight, None, init=cfg.init, scaling=cfg.scaling)
    return lora_A, lora_B


def _is_adapted(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is adapted_attention


def _emit_delta(graph: fx.Graph, path: str, scaling: float) -> fx.Node:
    """``(B @ A) * s`` from the factors under ``path`` (PEFT's ``get_delta_weight``)."""
    A = graph.get_attr(f"{path}.lora_A.weight")
    B = graph.get_attr(f"{path}.lora_B.weight")
    product = graph.call_function(operator.matmul, (B, A))
    return graph.call_function(operator.mul, (product, scaling))


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, branch: LoraBranch) -> fx.Node:
    weight = branch.lora_A.weight
    assert isinstance(weight, torch.Tensor)
    return node if weight.dtype == dtype else graph.call_method("to", (node, dtype))
