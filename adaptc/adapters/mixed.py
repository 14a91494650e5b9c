"""Mixed-adapter batches: one adapter per sample, in one forward.

Inside ``with adaptc.mixed_batch(model, ids):`` every adapted graph is re-emitted in its
*mixed* form: each target call is followed by one node, ``out = mixed_<kind>(x, out,
layer)``, that adds every sample's own LoRA term. The per-layer work is batched, not a
loop over adapters: the adapters' factors are stacked (zero-padded to the largest rank,
with a zero slot for the base), gathered by sample id and applied with two ``bmm``::

    A = A_stack[id + 1]                      # (batch, r_max, in)
    B = B_stack[id + 1]                      # (batch, out, r_max)
    out = base_out + bmm(bmm(x, Aᵀ), Bᵀ) · s[id + 1]

Rows are mapped to samples in batch-major order: a layer input of ``k · batch`` rows (a
sequence flattened into rows as OPT's ``fc1`` sees it, or a batch expanded per beam by
``generate``) gives each sample ``k`` consecutive rows. This is the sample index carried
through the graph by shape alone, so it survives any reshape that keeps the batch first.
Embeddings gather per token from the stacked tables; convolutions use the concatenation
of all adapters' factors with a per-sample mask. ``modules_to_save`` copies run each
sample group through its adapter's copy.

Ids index :func:`adapter_names` order; ``-1`` (or ``"__base__"`` by name) is the base
model alone. The stacked factors are cached per layer while the adapter weights do not
change (the cache is keyed on their version counters) and no gradient is wanted.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.compiler import Compiled, compiled, rebuild
from adaptc.compiler.saved import ModulesToSave
from adaptc.methods.base import Branch
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.embedding import EmbeddingBranch, embed_scale
from adaptc.methods.lora.method import rule_for
from adaptc.methods.lora.parameter import ParameterLoraBranch
from adaptc.methods.lora.variants import variant_title

__all__ = ["BASE", "MixedBatchError", "adapter_ids", "adapter_names", "mixed_batch"]

BASE = "__base__"
_VERSION = operator.attrgetter("_version")
_STATE = "_adaptc_mixed"  # attribute (in __dict__) of each target layer and saved module


class MixedBatchError(ValueError):
    """A mixed batch cannot run as asked (one line, names the layer or the id)."""


@dataclass(eq=False)
class MixedState:
    """The per-sample adapter ids of one model's mixed batch, shared by all its layers."""

    adapters: tuple[str, ...]
    ids: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # ids + 1: slot 0 of every stack is the base (zeros)
    # id(layer) -> its factor tensors (fixed while the block runs)
    params: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # id(layer) -> (key, stacked tensors); valid while the key (weights' versions) matches
    cache: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = field(default_factory=dict)
    # (id(layer), rows per sample) -> (channel owners, the masked matmul's mask for the ids)
    masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def set_ids(self, ids: torch.Tensor | None) -> None:
        self.ids = ids
        self.slots = None if ids is None else ids + 1
        self.masks.clear()


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The model's adapters in declared order: the meaning of the ids of a mixed batch."""
    return tuple(compiled(model, "adapter_names()").spec.adapters)


def adapter_ids(
    model: nn.Module, names: Sequence[str], device: torch.device | str | None = None
) -> torch.Tensor:
    """Ids (int64) for a list of adapter names; ``"__base__"`` is ``-1``."""
    order = adapter_names(model)
    ids = []
    for i, name in enumerate(names):
        if name == BASE:
            ids.append(-1)
        elif name in order:
            ids.append(order.index(name))
        else:
            raise MixedBatchError(
                f"sample {i}: the model has no adapter {name!r} (has: {', '.join(order)}, "
                f"and {BASE!r} for the base model)"
            )
    return torch.tensor(ids, dtype=torch.long, device=device)


@contextmanager
def mixed_batch(model: nn.Module, ids: torch.Tensor | Sequence[str]) -> Iterator[nn.Module]:
    """Run ``model`` with one adapter per sample inside the block.

    ``ids`` is a 1-d integer tensor (an index into :func:`adapter_names`, ``-1`` for the
    base model) or a list of names. Sample ``i``'s outputs equal those of running it alone
    with its adapter active. Training works too (gradients reach each sample's adapter;
    dropout uses each adapter's own probability). Nested blocks replace the ids.
    """
    info = compiled(model, "mixed_batch()")
    if info.merged is not None:
        raise MixedBatchError(
            f"the model has adapters merged in place ({', '.join(info.merged.adapters)}): "
            "unmerge them first"
        )
    id_tensor = _check_ids(model, info, ids)
    if info.disabled:  # inside adaptc.disabled(): every sample runs the base model
        yield model
        return
    _check_variants(model, info, id_tensor)
    state: MixedState | None = info.mixed
    if state is not None:  # already mixed: only the ids change
        previous = state.ids
        state.set_ids(id_tensor)
        try:
            yield model
        finally:
            state.set_ids(previous)
        return
    _check_supported(model)
    state = MixedState(tuple(info.spec.adapters))
    state.set_ids(id_tensor)
    holders = _attach(model, state)
    info.mixed = state
    try:
        rebuild(model, info.active, site=emit_mixed)
        yield model
    finally:
        info.mixed = None
        for module in holders:
            module.__dict__.pop(_STATE, None)
            module.__dict__.pop("route", None)
        rebuild(model, info.active)


def _check_ids(model: nn.Module, info: Compiled, ids: torch.Tensor | Sequence[str]) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        if isinstance(ids, str):
            raise MixedBatchError("ids: expected one adapter name per sample, got a string")
        device = next((p.device for p in model.parameters()), None)
        return adapter_ids(model, ids, device)
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise MixedBatchError(
            f"ids: expected a 1-d integer tensor (one id per sample), got {ids.dtype} of "
            f"shape {tuple(ids.shape)}"
        )
    n = len(info.spec.adapters)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n):
        raise MixedBatchError(
            f"ids: values must lie in -1..{n - 1} (-1 = base, 0..{n - 1} = "
            f"{', '.join(info.spec.adapters)}), got {int(ids.min())}..{int(ids.max())}"
        )
    return ids.long()


def _check_supported(model: nn.Module) -> None:
    branches = [m for m in model.modules() if isinstance(m, Branch)]
    if not branches:
        raise MixedBatchError("the model has no adapter branches (merged?): nothing to mix")
    for b in branches:
        if isinstance(b, ParameterLoraBranch):
            raise MixedBatchError(
                f"{b.target}: a targeted parameter cannot mix adapters in one batch (its "
                "update is added to the weight all samples share; PEFT refuses it too)"
            )
        if not isinstance(b, LoraBranch):
            raise MixedBatchError(f"{b.target}: adapter {b.adapter!r} is a {b.method} adapter; "
                                  "mixed batches support LoRA adapters only")  # fmt: skip
        try:
            b.factors()  # one (A, B) pair per branch: nn.MultiheadAttention's has two
        except ValueError as exc:
            raise MixedBatchError(str(exc)) from None
        groups = getattr(getattr(b, "lora_B", None), "groups", 1)
        if groups != 1:
            raise MixedBatchError(f"{b.target}: grouped convolutions (groups={groups}) cannot mix")
        if getattr(b, "max_norm", None) is not None or getattr(b, "sparse", False):
            raise MixedBatchError(
                f"{b.target}: embedding adapters with max_norm or sparse gradients cannot mix"
            )


def _check_variants(model: nn.Module, info: Compiled, ids: torch.Tensor) -> None:
    """An adapter with a variant (DoRA) cannot be in the batch; the model may carry one
    (as with PEFT, only the adapters the samples use are checked)."""
    names = tuple(info.spec.adapters)
    used = {names[i] for i in set(ids.tolist()) if i >= 0}
    for b in model.modules():
        if isinstance(b, LoraBranch) and b.variant is not None and b.adapter in used:
            title = variant_title(b.variant)
            raise MixedBatchError(f"{b.target}: adapter {b.adapter!r} uses {title}, which mixed "
                                  "batches do not support")  # fmt: skip


def _attach(model: nn.Module, state: MixedState) -> list[nn.Module]:
    """Point every target layer and saved module at ``state``; returns them."""
    holders: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            module.__dict__["route"] = _saved_route(state)
            holders.append(module)
        elif any(isinstance(c, LoraBranch) for c in module.children()):
            module.__dict__[_STATE] = state
            holders.append(module)
    return holders


def _saved_route(state: MixedState) -> Any:
    def route(module: ModulesToSave, args: Any, kwargs: Any) -> Any:
        if state.ids is None:
            return NotImplemented
        return mixed_saved_forward(module, state, args, kwargs)

    return route


# --- graph emission ----------------------------------------------------------------------


def emit_mixed(
    graph: fx.Graph, x: fx.Node, base_out: fx.Node, layer_path: str, layer: nn.Module
) -> fx.Node:
    """Insert ``mixed_<form>(x, base_out, layer)`` after ``base_out``; return it (the
    kernel is the one of the layer's LoRA rule's ``batch_form``)."""
    if not any(isinstance(b, LoraBranch) and b.variant is None for b in layer.children()):
        return base_out  # only variant (DoRA) adapters here: never in a batch (_check_variants)
    rule = rule_for(layer)
    fn = None if rule is None else _KERNELS.get(rule.batch_form)
    if fn is None:  # pragma: no cover - every LoRA rule has a form
        raise MixedBatchError(f"{layer_path}: {type(layer).__name__} layers cannot mix")
    with graph.inserting_before(base_out.next):
        module = graph.get_attr(layer_path)
        return graph.call_function(fn, (x, base_out, module))


# --- the per-layer computations (called from the graphs) ---------------------------------


def _state(layer: nn.Module) -> tuple[MixedState, torch.Tensor]:
    state: MixedState = layer.__dict__[_STATE]
    assert state.slots is not None
    return state, state.slots


def _branches(layer: nn.Module, state: MixedState) -> list[LoraBranch | None]:
    found = {
        b.adapter: b
        for b in layer.children()
        if isinstance(b, LoraBranch) and b.variant is None  # never in the batch: see above
    }
    return [found.get(a) for a in state.adapters]


def _sample_rows(layer: nn.Module, x: torch.Tensor, batch: int, min_dim: int = 2) -> int:
    """Rows per sample of ``x`` (batch-major); an error names the layer when they don't split."""
    if x.dim() < min_dim or batch == 0 or x.shape[0] % batch:
        target = next((b.target for b in layer.children() if isinstance(b, LoraBranch)), "?")
        raise MixedBatchError(
            f"{target}: input of shape {tuple(x.shape)} does not split into the batch's "
            f"{batch} samples (the batch must come first)"
        )
    return int(x.shape[0]) // batch


def _cached(layer: nn.Module, state: MixedState, build: Any) -> Any:
    """``build()``, reused while the layer's factors are unchanged and no gradient is
    wanted (keyed on their version counters: an optimizer step or a hotswap rebuilds)."""
    params = state.params.get(id(layer))
    if params is None:
        params = state.params[id(layer)] = _factors(layer, state)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in params)
    ):
        return build()
    key = (params[0].data_ptr(), *map(_VERSION, params))
    hit = state.cache.get(id(layer))
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    state.cache[id(layer)] = (key, value)
    return value


def _masked(xs: torch.Tensor, per: int, rank: int, total: int, out_features: int) -> bool:
    """Whether the masked matmul beats the gathered ``bmm``. On a CPU (compute-bound) it
    does when a sample has few rows; on a GPU, while its extra work stays small (the
    gathers' launches and copies cost more than a few GFLOP there)."""
    if xs.is_cuda:
        return xs.shape[0] * per * total * (xs.shape[-1] + out_features) <= 1 << 31
    return per * (total - rank) <= 4 * rank


def _mask(
    layer: nn.Module,
    state: MixedState,
    owner: torch.Tensor,
    row_idx: torch.Tensor,
    per: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """1 where a channel belongs to the row's adapter; kept for the block's ids."""
    if torch.compiler.is_compiling():
        return (owner.unsqueeze(0) == row_idx.unsqueeze(1)).to(dtype)
    hit = state.masks.get((id(layer), per))
    if hit is not None and hit[0] is owner:
        return hit[1]
    mask = (owner.unsqueeze(0) == row_idx.unsqueeze(1)).to(dtype)
    state.masks[(id(layer), per)] = (owner, mask)
    return mask


def _dropout(x: torch.Tensor, p: torch.Tensor | None, training: bool) -> torch.Tensor:
    """Per-sample dropout: ``p`` (batch,) broadcast over each sample's rows."""
    if p is None or not training:
        return x
    p = p.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    keep = torch.rand_like(x) >= p
    return x * keep / (1 - p)


def _linear_stacks(layer: nn.Module, state: MixedState) -> tuple[Any, ...]:
    """The adapters' factors, two ways, with each adapter's scale folded into ``B``:
    stacked by slot (zero-padded to the largest rank, slot 0 the base) for the gathered
    ``bmm``, and concatenated along the rank with each channel's slot for the masked
    matmul."""
    branches = _branches(layer, state)
    present = [b for b in branches if b is not None]
    A0, B0 = _weight(present[0].lora_A), _weight(present[0].lora_B)
    r = max(int(_weight(b.lora_A).shape[0]) for b in present)
    in_f, out_f = A0.shape[1], B0.shape[0]
    zeros_a, zeros_b, zero_bias = A0.new_zeros(r, in_f), B0.new_zeros(out_f, r), B0.new_zeros(out_f)
    As, Bs, biases, ps = [zeros_a], [zeros_b], [zero_bias], [0.0]
    cat_a, cat_b, owner = [], [], []
    for slot, b in enumerate(branches, start=1):
        if b is None:
            As.append(zeros_a)
            Bs.append(zeros_b)
            biases.append(zero_bias)
            ps.append(0.0)
            continue
        A, Bw = _weight(b.lora_A), _weight(b.lora_B) * b.scaling
        pad = r - A.shape[0]
        As.append(F.pad(A, (0, 0, 0, pad)) if pad else A)
        Bs.append(F.pad(Bw, (0, pad)) if pad else Bw)
        cat_a.append(A)
        cat_b.append(Bw)
        owner.extend([slot] * A.shape[0])
        bias = b.lora_B.bias if b.lora_bias else None
        biases.append(bias * b.scaling if isinstance(bias, torch.Tensor) else zero_bias)
        drop = b.lora_dropout
        ps.append(float(drop.p) if isinstance(drop, nn.Dropout) else 0.0)
    any_bias = any(b is not None and b.lora_bias for b in branches)
    return (
        torch.stack(As).mT.contiguous(),  # (n+1, in, r)
        torch.stack(Bs).mT.contiguous(),  # (n+1, r, out), scaled
        torch.stack(biases) if any_bias else None,  # (n+1, out), scaled
        torch.tensor(ps, device=A0.device) if any(p > 0 for p in ps) else None,
        torch.cat(cat_a).T.contiguous(),  # (in, Σr)
        torch.cat(cat_b, dim=1).T.contiguous(),  # (Σr, out), scaled
        torch.tensor(owner, device=A0.device),  # the slot of each of the Σr channels
    )


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _factors(layer: nn.Module, state: MixedState) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for b in _branches(layer, state):
        if b is not None:
            out.extend(p for p in b.parameters())
    return out


def mixed_linear(x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``base_out`` plus each sample's ``s·B·A·x`` (linear layers and ``Conv1D``).

    Many rows per sample (a prefill): the factors are gathered per sample and applied with
    ``bmm`` at the largest rank. Few rows (a decode step): gathering would copy more than
    it saves, so the rows go through all adapters' concatenated factors at once, masked
    to their own adapter's channels — two plain matmuls, no copies.
    """
    state, idx = _state(layer)
    A, B, bias, ps, cat_a, cat_b, owner = _cached(
        layer, state, lambda: _linear_stacks(layer, state)
    )
    batch = idx.shape[0]
    _sample_rows(layer, x, batch)
    xs = x.reshape(batch, -1, x.shape[-1]).to(A.dtype)
    xs = _dropout(xs, ps[idx] if ps is not None else None, layer.training)
    per, rank, total = xs.shape[1], A.shape[-1], cat_a.shape[-1]
    fused = base_out.dtype == A.dtype  # the add goes into the second matmul
    if _masked(xs, per, rank, total, base_out.shape[-1]):
        rows = xs.reshape(-1, xs.shape[-1])
        row_idx = idx.repeat_interleave(per) if per > 1 else idx
        h = (rows @ cat_a) * _mask(layer, state, owner, row_idx, per, rows.dtype)
        flat = base_out.reshape(-1, base_out.shape[-1])
        out = torch.addmm(flat, h, cat_b) if fused else flat + h @ cat_b
        if bias is not None:
            out = out + bias[row_idx]
    else:
        by_sample = base_out.reshape(batch, -1, base_out.shape[-1])
        h = torch.bmm(xs, A[idx])  # (batch, rows, r)
        out = torch.baddbmm(by_sample, h, B[idx]) if fused else by_sample + torch.bmm(h, B[idx])
        if bias is not None:
            out = out + bias[idx].unsqueeze(1)
    result: torch.Tensor = out.reshape(base_out.shape).to(base_out.dtype)
    return result


def _embedding_stacks(layer: nn.Module, state: MixedState) -> tuple[Any, ...]:
    branches = _branches(layer, state)
    present = [b for b in branches if isinstance(b, EmbeddingBranch)]
    A0, B0 = present[0].lora_embedding_A, present[0].lora_embedding_B
    r = max(int(b.lora_embedding_A.shape[0]) for b in present)
    n_emb, dim = A0.shape[1], B0.shape[0]
    zeros_a, zeros_b = A0.new_zeros(n_emb, r), B0.new_zeros(dim, r)
    tables, Bs, scales = [zeros_a], [zeros_b], [0.0]
    for b in branches:
        if not isinstance(b, EmbeddingBranch):
            tables.append(zeros_a)
            Bs.append(zeros_b)
            scales.append(0.0)
            continue
        pad = r - b.lora_embedding_A.shape[0]
        tables.append(F.pad(b.lora_embedding_A.T, (0, pad)) if pad else b.lora_embedding_A.T)
        Bs.append(F.pad(b.lora_embedding_B, (0, pad)) if pad else b.lora_embedding_B)
        scales.append(float(b.scaling))
    padding_idx = present[0].padding_idx
    return (
        torch.cat(tables),  # ((n+1) · num_embeddings, r)
        torch.stack(Bs).mT.contiguous(),  # (n+1, r, dim)
        torch.tensor(scales, dtype=A0.dtype, device=A0.device),
        n_emb,
        padding_idx,
    )


def mixed_embedding(x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``base_out`` plus each token's ``s·embed(x, Aᵀ)·Bᵀ`` for its sample's adapter."""
    state, idx = _state(layer)
    table, B, scales, n_emb, padding_idx = _cached(
        layer, state, lambda: _embedding_stacks(layer, state)
    )
    batch = idx.shape[0]
    _sample_rows(layer, x, batch, min_dim=1)
    tokens = x.reshape(batch, -1)
    flat = tokens + (idx * n_emb).unsqueeze(1)
    h = F.embedding(flat, table)  # (batch, tokens, r)
    if padding_idx is not None and torch.is_grad_enabled() and table.requires_grad:
        h = torch.where((tokens == padding_idx).unsqueeze(-1), h.detach(), h)
    h = torch.bmm(h, B[idx]) * scales[idx].view(batch, 1, 1)
    scale = embed_scale(layer)
    if scale is not None:
        h = h * (scale.to(h.dtype) if isinstance(scale, torch.Tensor) else scale)
    out: torch.Tensor = (base_out + h.reshape(base_out.shape)).to(base_out.dtype)
    return out


def _conv_stacks(layer: nn.Module, state: MixedState) -> tuple[Any, ...]:
    branches = _branches(layer, state)
    present = [b for b in branches if b is not None]
    A0, B0 = present[0].lora_A.weight, present[0].lora_B.weight
    assert isinstance(A0, torch.Tensor) and isinstance(B0, torch.Tensor)
    As, Bs, owner, biases, ps = [], [], [], [B0.new_zeros(B0.shape[0])], [0.0]
    for slot, b in enumerate(branches, start=1):
        if b is None:
            biases.append(biases[0])
            ps.append(0.0)
            continue
        A, Bw = b.lora_A.weight, b.lora_B.weight
        assert isinstance(A, torch.Tensor) and isinstance(Bw, torch.Tensor)
        As.append(A)
        Bs.append(Bw * b.scaling)
        owner.extend([slot] * A.shape[0])
        bias = b.lora_B.bias if b.lora_bias else None
        biases.append(bias * b.scaling if isinstance(bias, torch.Tensor) else biases[0])
        drop = b.lora_dropout
        ps.append(float(drop.p) if isinstance(drop, nn.Dropout) else 0.0)
    lora_A = present[0].lora_A
    assert isinstance(lora_A, nn.modules.conv._ConvNd)
    any_bias = any(b is not None and b.lora_bias for b in branches)
    return (
        torch.cat(As),  # (Σr, in, *k)
        torch.cat(Bs, dim=1),  # (out, Σr, 1, …)
        torch.tensor(owner, device=A0.device),  # the slot of each of the Σr channels
        torch.stack(biases) if any_bias else None,
        torch.tensor(ps, device=A0.device) if any(p > 0 for p in ps) else None,
        lora_A,
    )


def mixed_conv(x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``base_out`` plus each sample's term, through all adapters' channels, masked."""
    state, idx = _state(layer)
    A, B, owner, bias, ps, lora_A = _cached(layer, state, lambda: _conv_stacks(layer, state))
    batch = idx.shape[0]
    if _sample_rows(layer, x, batch) != 1:
        raise MixedBatchError(
            f"{layer.__class__.__name__}: convolution input of shape {tuple(x.shape)} has not "
            f"one row per sample"
        )
    xs = _dropout(x.to(A.dtype), ps[idx] if ps is not None else None, layer.training)
    h = lora_A._conv_forward(xs, A, None)  # (batch, Σr, …)
    mask = (owner.unsqueeze(0) == idx.unsqueeze(1)).to(h.dtype)  # (batch, Σr)
    h = h * mask.view(*mask.shape, *([1] * (h.dim() - 2)))
    nd = h.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = conv(h, B)
    if bias is not None:
        out = out + bias[idx].view(batch, -1, *([1] * nd))
    return (base_out + out).to(base_out.dtype)


def mixed_saved_forward(module: nn.Module, state: MixedState, args: Any, kwargs: Any) -> Any:
    """A ``modules_to_save`` wrapper in a mixed batch: each sample group through its copy."""
    assert isinstance(module, ModulesToSave) and state.slots is not None
    first = None if args else next(iter(kwargs))  # the input passed by keyword
    x = args[0] if args else kwargs[first]
    rest = args[1:]
    idx = state.slots
    per = _sample_rows(module, x, idx.shape[0], min_dim=1)
    rows = idx.repeat_interleave(per) if per > 1 else idx
    copies = module.modules_to_save
    out: torch.Tensor | None = None
    for slot in torch.unique(rows).tolist():  # a loop over the adapters present, as PEFT does
        name = state.adapters[slot - 1] if slot else None
        target = copies[name] if name is not None and name in copies else module.original_module
        where = (rows == slot).nonzero().squeeze(1)
        part = x.index_select(0, where)
        y = target(part, *rest, **kwargs) if args else target(**{**kwargs, first: part})
        if not isinstance(y, torch.Tensor):
            raise MixedBatchError(
                f"modules_to_save {type(target).__name__}: mixed batches need a tensor output"
            )
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out = out.index_copy(0, where, y)
    assert out is not None
    return out


_KERNELS: dict[str, Any] = {
    "linear": mixed_linear,
    "conv": mixed_conv,
    "embedding": mixed_embedding,
}
