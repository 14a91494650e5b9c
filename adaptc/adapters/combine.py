"""Combining adapters: a new adapter from a weighted mix of a model's adapters (PEFT's
``add_weighted_adapter``).

``combine_adapters(model, ["a", "b"], [0.7, 0.3], "ab")`` builds the new adapter's spec from
the sources as PEFT builds its config — the first adapter's settings with ``r`` (and
``lora_alpha = r``) from the combination type, the union of the targets and no rank/alpha
patterns — adds it with :func:`~adaptc.adapters.manage.add_adapter`, then fills each of
its branches from the branches of the sources on the same layer:

* ``cat``: ``A = [w₁s₁A₁; w₂s₂A₂]``, ``B = [B₁ B₂]``, so ``B·A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` exactly;
* ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``: the factors are merged separately,
  ``A`` with ``sign(wᵢsᵢ)·√|wᵢsᵢ|`` and ``B`` with ``√|wᵢsᵢ|`` (a rough approximation);
* ``*svd``: the deltas ``sᵢ·Bᵢ·Aᵢ`` are merged, then truncated to rank ``r`` by SVD
  (``B = U·diag(S)``, ``A = Vᴴ``).

The merging rules (``task_arithmetic``, TIES, DARE, magnitude pruning) are PEFT's
``merge_utils`` with the same operations in the same order, so DARE's random masks draw
what PEFT draws: the same ``torch.manual_seed`` gives the same adapter. The new adapter
starts inactive and frozen, as in PEFT.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from adaptc.adapters.manage import add_adapter, delete_adapter
from adaptc.adapters.switch import set_active
from adaptc.compiler import AdaptcWarning, Compiled, CompileError, compiled
from adaptc.compiler.saved import ModulesToSave
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.method import rule_for
from adaptc.methods.lora.parameter import ParameterLoraBranch
from adaptc.methods.lora.spec import LoraAdapter
from adaptc.spec import Spec
from adaptc.spec.fields import ADAPTER_NAME_PATTERN, NameTargets, RegexTargets, Targets

__all__ = ["COMBINATION_TYPES", "combine_adapters"]

CombinationType = Literal[
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
# merging type -> (how each task tensor is pruned, whether signs are elected as in TIES)
_MERGING: dict[str, tuple[Literal["magnitude", "random"] | None, bool]] = {
    "linear": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "magnitude_prune": ("magnitude", False),
}
_SVD = {"svd": "linear"} | {f"{k}_svd": k for k in _MERGING if k != "linear"}
COMBINATION_TYPES: tuple[str, ...] = ("cat", *_MERGING, *_SVD)


@torch.no_grad()
def combine_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    combination_type: CombinationType | str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] | str = "total",
) -> None:
    """Add adapter ``name`` to the compiled ``model`` (in place): ``adapters`` mixed by ``weights``.

    The arguments are those of PEFT's ``add_weighted_adapter``; ``density`` (the fraction
    of values kept) is required by the pruning types, ``majority_sign_method`` is used by
    the TIES types, ``svd_*`` by the SVD types. The new adapter is inactive
    (``adaptc.set_active`` chooses) and its parameters do not require grad.
    """
    info = compiled(model, "combine_adapters()")
    _check(info, model, adapters, weights, name, combination_type)
    kind = "linear" if len(adapters) == 1 else combination_type  # PEFT: one adapter is linear
    settings = _new_settings(info, adapters, kind, svd_rank)
    _check_merge_args(kind, density, majority_sign_method)
    options = _Options(svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)
    add_adapter(model, Spec(version=1, adapters={name: settings}))
    previous = info.active
    try:
        _fill(model, info, list(adapters), [float(w) for w in weights], name, kind, options)
    except BaseException:
        delete_adapter(model, name)  # nothing half-made stays behind
        set_active(model, previous)
        raise
    for module in model.modules():
        if isinstance(module, LoraBranch) and module.adapter == name:
            module.requires_grad_(False)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            module.modules_to_save[name].requires_grad_(False)


# --- checks and the new adapter's settings ------------------------------------------------


@dataclass(frozen=True)
class _Options:
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None
    density: float | None
    majority_sign_method: str


def _check(
    info: Compiled,
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    combination_type: str,
) -> None:
    if isinstance(adapters, str) or not adapters:
        raise ValueError("adapters must be a non-empty list of adapter names")
    for branch in model.modules():
        if isinstance(branch, ParameterLoraBranch) and branch.adapter in adapters:
            raise CompileError(
                f"{branch.target}: combining adapters of a targeted parameter is not "
                "supported (target_parameters)"
            )
    for adapter in adapters:
        if adapter not in info.spec.adapters:
            raise CompileError(
                f"Adapter {adapter} does not exist (has: {', '.join(info.spec.adapters)})"
            )
    for adapter in adapters:
        if not isinstance(info.spec.adapters[adapter], LoraAdapter):
            raise CompileError(
                f"adapter {adapter!r} is a {info.spec.adapters[adapter].method} adapter; "
                "only LoRA adapters can be combined"
            )
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters: one each")
    if name in info.spec.adapters:
        raise CompileError(f"the model already has adapter {name!r}")
    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise ValueError(f"adapter name {name!r} does not match {ADAPTER_NAME_PATTERN}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"Invalid combination_type: {combination_type!r} "
            f"(choose one of {', '.join(COMBINATION_TYPES)})"
        )
    saved = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    clashes = [w for w in saved if sum(a in w.modules_to_save for a in adapters) > 1]
    if clashes:
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, "
            f"but found {len(clashes)} such instance(s)."
        )
    first = info.spec.adapters[adapters[0]]  # its settings are the new adapter's
    if first.init in ("pissa", "olora", "loftq"):
        raise CompileError(
            f"adapter {adapters[0]!r} has init {first.init!r}, which rewrites base weights: "
            "put an adapter with another init first"
        )
    if first.bias != "none":
        raise CompileError(
            f"adapter {adapters[0]!r} trains biases (bias={first.bias!r}), which the combined "
            "adapter would share: put an adapter with bias 'none' first"
        )


def _check_merge_args(kind: str, density: float | None, sign_method: str) -> None:
    rule = _SVD.get(kind, kind)
    if rule in _MERGING and _MERGING[rule][0] is not None:
        if density is None:
            raise ValueError(f"combination_type {kind!r} needs density (the fraction kept, 0..1)")
        if density < 0:
            raise ValueError(f"Density should be >= 0, got {density}")
        if density >= 1:
            warnings.warn(
                f"The density {density} is greater than or equal to 1, no pruning will be "
                "performed.",
                AdaptcWarning,
                stacklevel=4,  # the caller of combine_adapters (under no_grad)
            )
    if sign_method not in ("total", "frequency"):
        raise ValueError(
            f"majority_sign_method must be 'total' or 'frequency', not {sign_method!r}"
        )


def _new_settings(
    info: Compiled, adapters: Sequence[str], kind: str, svd_rank: int | None
) -> LoraAdapter:
    """The first adapter's settings with PEFT's new ``r``, ``lora_alpha`` and targets."""
    sources = [info.spec.adapters[a] for a in adapters]
    # the largest rank an adapter has anywhere, so every target fits
    ranks = [max([s.r, *s.rank_pattern.values()]) for s in sources]
    if kind == "cat":
        rank = sum(ranks)
    elif kind in _SVD:
        rank = svd_rank or max(ranks)
    elif len(set(ranks)) != 1:
        listed = ", ".join(f"{a!r}: r={r}" for a, r in zip(adapters, ranks, strict=True))
        raise CompileError(
            f"combination_type {kind!r} needs adapters of one rank ({listed}); "
            "use 'cat' or an svd type to combine different ranks"
        )
    else:
        rank = ranks[0]
    data: dict[str, Any] = sources[0].model_dump()
    data.update(
        r=rank,
        lora_alpha=rank,
        rank_pattern={},
        alpha_pattern={},
        targets=_union_targets(info, adapters),
    )
    try:
        return LoraAdapter.model_validate(data)
    except ValidationError as exc:
        raise CompileError(
            f"cannot combine {', '.join(adapters)}: {exc.errors()[0]['msg']}"
        ) from None


def _union_targets(info: Compiled, adapters: Sequence[str]) -> Targets | None:
    """PEFT's rule: regexes joined as ``(p1)|(p2)``, name lists united; no mix of the two.

    Selectors PEFT would have expanded to names (``all-linear``, the model type's defaults,
    adaptc's ``types``) are kept when all adapters share them, else become module paths.
    """
    chosen = [info.spec.adapters[a].targets for a in adapters]
    regex = [t for t in chosen if isinstance(t, RegexTargets)]
    if len(regex) == len(chosen):
        return RegexTargets(kind="regex", pattern="|".join(f"({t.pattern})" for t in regex))
    if regex:
        raise CompileError(
            "all adapters must select their targets the same way: combining regex targets "
            "with name lists is not supported (PEFT: target_modules str vs list)"
        )
    if all(t == chosen[0] for t in chosen):
        first: Targets | None = chosen[0]
        return first
    names: dict[str, None] = {}
    for adapter, targets in zip(adapters, chosen, strict=True):
        if isinstance(targets, NameTargets):
            names.update(dict.fromkeys(targets.names))
        else:
            names.update(dict.fromkeys(t.path for t in info.plan.targets if t.adapter == adapter))
    return NameTargets(kind="names", names=tuple(names))


# --- filling the new branches ---------------------------------------------------------------


def _fill(
    model: nn.Module,
    info: Compiled,
    adapters: list[str],
    weights: list[float],
    name: str,
    kind: str,
    options: _Options,
) -> None:
    """Set the new adapter's factors on every target, in the model's module order (as PEFT)."""
    layers: dict[tuple[str, str], tuple[nn.Module, LoraBranch]] = {}
    for module in model.modules():
        for child in module.children():
            if isinstance(child, LoraBranch):
                layers[(child.target, child.adapter)] = (module, child)
    for target in [t for t in info.plan.targets if t.adapter == name]:
        layer, new = layers[(target.path, name)]
        sources = [
            (layers[(target.path, a)][1], w)
            for a, w in zip(adapters, weights, strict=True)
            if (target.path, a) in layers
        ]
        if not sources:
            raise CompileError(f"{target.path}: none of {', '.join(adapters)} adapts this module")
        if kind == "cat":
            A, B = _cat(sources)
        elif kind in _SVD:
            A, B = _svd(layer, new, sources, _SVD[kind], options)
        else:
            A, B = _factor_mix(target.path, sources, kind, options)
        new_A, new_B = factors(new)
        _put(new_A, new_B, A, B)


def factors(branch: LoraBranch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a branch (:meth:`LoraBranch.factors`)."""
    return branch.factors()


def _put(new_A: torch.Tensor, new_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write ``A``/``B`` into the new factors; a smaller rank is padded with zeros (same B·A)."""
    new_A.zero_()
    new_B.zero_()
    new_A[: A.shape[0]] = A.to(new_A.dtype)
    new_B[:, : B.shape[1]] = B.to(new_B.dtype)


def _cat(sources: list[tuple[LoraBranch, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    As = [factors(b)[0] * w * b.scaling for b, w in sources]  # (rᵢ, in, …)
    Bs = [factors(b)[1] for b, _ in sources]  # (out, rᵢ, …)
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _factor_mix(
    path: str, sources: list[tuple[LoraBranch, float]], kind: str, options: _Options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the A factors and the B factors separately, each weighted by ``√|w·s|``."""
    shapes = {tuple(factors(b)[0].shape) for b, _ in sources}
    if len(shapes) > 1:
        ranks = ", ".join(f"{b.adapter!r}: r={b.r}" for b, _ in sources)
        raise CompileError(
            f"{path}: combination_type {kind!r} needs one rank per module ({ranks}); "
            "use 'cat' or an svd type"
        )
    weights_A, weights_B = [], []
    for branch, weight in sources:
        scaled = weight * branch.scaling
        sign = 1 if scaled >= 0 else -1  # the sign goes on A only, or it would cancel out
        weights_A.append(math.sqrt(abs(scaled)) * sign)
        weights_B.append(math.sqrt(abs(scaled)))
    As = [factors(b)[0] for b, _ in sources]
    Bs = [factors(b)[1] for b, _ in sources]
    dtype = As[0].dtype
    mixed = [
        _merge(kind, tensors, torch.tensor(w).to(tensors[0].device), options)
        for tensors, w in ((As, weights_A), (Bs, weights_B))  # A first: DARE draws as PEFT
    ]
    return mixed[0].to(dtype), mixed[1].to(dtype)


def _svd(
    layer: nn.Module,
    new: LoraBranch,
    sources: list[tuple[LoraBranch, float]],
    rule: str,
    options: _Options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the deltas ``s·B·A``; the rank-``rank`` SVD factors are the new ``B``, ``A``."""
    found = rule_for(layer)
    assert found is not None
    deltas = [found.delta_weight(layer, b) for b, _ in sources]  # in the base weight's layout
    weights = torch.tensor([w for _, w in sources]).to(deltas[0].device)
    delta = _merge(rule, deltas, weights, options)
    if delta.dim() > 2:  # a convolution: (out, in·k…)
        delta = delta.flatten(start_dim=1)
    if new.fan_in_fan_out:  # stored (in, out): Conv1D, embeddings
        delta = delta.T
    U, S, Vh = torch.linalg.svd(
        delta, full_matrices=options.svd_full_matrices, driver=options.svd_driver
    )
    U = U[:, : new.r] @ torch.diag(S[: new.r])  # (out, k)
    Vh = Vh[: new.r, :]  # (k, in·k…)
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), options.svd_clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    new_A, new_B = factors(new)
    k = min(U.shape[1], Vh.shape[0])
    A = Vh[:k].reshape(k, *new_A.shape[1:])
    B = U[:, :k].reshape(new_B.shape[0], k, *new_B.shape[2:])
    return A, B


# --- PEFT's merging rules (merge_utils), same operations in the same order -----------------


def _merge(
    rule: str, tensors: list[torch.Tensor], weights: torch.Tensor, options: _Options
) -> torch.Tensor:
    """``Σ wᵢ·tᵢ`` after pruning each ``tᵢ``; with TIES, only values of the elected sign."""
    method, elect = _MERGING[rule]
    density = options.density
    if method is not None and density is not None and density < 1:
        tensors = [_prune(t, density, method) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, …)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if not elect:
        return weighted.sum(dim=0)
    mask = _majority_sign_mask(stacked, options.majority_sign_method)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _prune(tensor: torch.Tensor, density: float, method: str) -> torch.Tensor:
    if method == "magnitude":  # keep the int(density·n) largest |values|
        mask = torch.zeros_like(tensor).reshape(-1)
        top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
        mask[top[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    # DARE: keep each value with probability density, rescaled by 1/density
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    return tensor * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority
