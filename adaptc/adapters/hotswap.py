"""Hotswapping: new adapter weights, in place, into a model that ``torch.compile`` compiled.

``prepare_hotswap`` (once, before ``torch.compile``) makes the generated code independent
of the adapter's rank and scaling: it pads every factor of the chosen adapters with zeros
to ``max_rank`` (``B·A`` is unchanged) and gives each branch its scaling as a 0-d,
non-persistent buffer that the graph reads instead of a baked constant::

    mul = fc_lora_default_lora_b * 2.0                           # before
    fc_lora_default_scaling_tensor = self.fc.lora_default.scaling_tensor
    mul = fc_lora_default_lora_b * fc_lora_default_scaling_tensor  # after

``hotswap`` then copies a saved adapter into those tensors (zero-padding a smaller rank,
zeroing the layers the new adapter does not target) and fills the scaling buffers: the
code, the shapes and the parameter objects stay, so dynamo does not recompile. The
recorded spec and plan become the new adapter's, and each branch keeps its true rank in
``r``, so saving writes the new adapter's tensors at their true rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adaptc.adapters.keys import PREFIX, AdapterKeyError, adapter_tensors, is_base_tensor
from adaptc.compiler import Compiled, CompileError, compiled, compiled_info, rebuild
from adaptc.layers import kind_of
from adaptc.methods.lora.branch import RANK_DIMS, SCALING_BUFFER, LoraBranch
from adaptc.methods.lora.dora import DoraConvBranch, conv_weight_norm, linear_weight_norm
from adaptc.methods.lora.method import METHOD as LORA
from adaptc.methods.lora.parameter import ParameterLoraBranch
from adaptc.methods.lora.rule import BranchConfig
from adaptc.methods.lora.spec import LoraAdapter
from adaptc.plan.plan import PlannedTarget, plan_target

__all__ = ["HotswapError", "hotswap_tensors", "is_prepared", "prepare_hotswap"]

_PREPARE = "call adaptc.prepare_hotswap(model, max_rank=...) before torch.compile"


class HotswapError(ValueError):
    """The new adapter cannot replace the old one in place (one line, says what to do)."""


def prepare_hotswap(
    model: nn.Module, max_rank: int | None = None, adapters: list[str] | None = None
) -> None:
    """Make ``model`` (compiled by adaptc, not yet by torch) hotswappable without recompiling.

    Pads the factors of every branch of ``adapters`` (default: all) with zeros to rank
    ``max_rank`` (None: keep the ranks), turns their scalings into buffers the graphs read,
    and regenerates the graphs. Outputs are unchanged; no state-dict key is added. In
    place; create optimizers afterwards (padded factors are new parameters).
    """
    info = _info(model, "prepare_hotswap")
    if _torch_compiled(model):
        raise HotswapError(
            "prepare_hotswap() must be called before torch.compile: it changes the generated code"
        )
    if info.mixed is not None:
        raise HotswapError(
            "prepare_hotswap() cannot run inside adaptc.mixed_batch(): call it before"
        )
    names = list(info.spec.adapters) if adapters is None else list(adapters)
    _check_names(info, names)
    if max_rank is not None and (isinstance(max_rank, bool) or max_rank < 1):
        raise HotswapError(f"max_rank must be a positive integer, got {max_rank!r}")
    branches = [b for b in _branches(model) if b.adapter in names]
    _check_factors(branches)
    if max_rank is not None:
        for branch in branches:  # check all before padding any
            rank = _padded_rank(branch)
            if rank > max_rank:
                raise HotswapError(
                    f"adapter {branch.adapter!r}: {branch.target} already has rank {rank}, "
                    f"more than max_rank={max_rank}"
                )
            groups = _groups(branch)
            if rank < max_rank and groups > 1:
                raise HotswapError(
                    f"adapter {branch.adapter!r}: {branch.target} is a convolution with "
                    f"groups={groups}; padding its rank for hotswapping is not supported"
                )
    with torch.no_grad():
        for branch in branches:
            if max_rank is not None:
                _pad(branch, max_rank)
            if SCALING_BUFFER not in branch._buffers:
                branch.register_buffer(
                    SCALING_BUFFER, _scaling_tensor(branch, branch.scaling), persistent=False
                )
    rebuild(model, info.active)


def is_prepared(model: nn.Module, adapter: str = "default") -> bool:
    """Whether every branch of ``adapter`` reads its scaling from a buffer."""
    branches = [b for b in _branches(model) if b.adapter == adapter]
    return bool(branches) and all(SCALING_BUFFER in b._buffers for b in branches)


def hotswap_tensors(
    model: nn.Module,
    settings: LoraAdapter,
    state: dict[str, torch.Tensor],
    adapter: str = "default",
    *,
    where: str = "the state dict",
) -> None:
    """Replace adapter ``adapter`` of ``model`` by ``settings`` and its tensors ``state``
    (by PEFT key), in place; ``where`` names their source in messages.

    The new adapter may target a subset of the old one's layers (the others get zero
    weights) and have another rank (up to the prepared ``max_rank``) or scaling (if
    prepared). Nothing is written unless every check passes. The model may be wrapped by
    ``torch.compile``. (``adaptc.hotswap`` reads a directory, a hub id or a state dict and
    calls this.)
    """
    model = getattr(model, "_orig_mod", model)
    info = _info(model, "hotswap")
    _check_names(info, [adapter])
    if not isinstance(settings, LoraAdapter):
        raise HotswapError(f"{where} holds a {settings.method} adapter; hotswapping is for LoRA")
    _check_factors([b for b in _branches(model) if b.adapter == adapter])
    swaps, placeholders = _plan_swaps(model, info, adapter, settings, state, where)
    with torch.no_grad():
        for swap in swaps:
            swap.apply()
        for branch in placeholders:
            _empty(model, branch)
    info.spec = info.spec.with_adapters({**info.spec.adapters, adapter: settings})
    ours = tuple(s.planned for s in swaps if s.planned is not None)  # in the model's order
    info.plan = info.plan.replacing_adapter(adapter, ours)


# --- checking ---------------------------------------------------------------------------


@dataclass
class _Swap:
    """One tensor to overwrite, and (for a branch's first tensor) the branch's new settings."""

    branch: LoraBranch | None  # None: not a LoRA tensor (a bias, a modules_to_save copy)
    param: torch.Tensor
    value: torch.Tensor
    rank_dim: int | None
    planned: PlannedTarget | None = None

    def apply(self) -> None:
        value = self.value.to(device=self.param.device, dtype=self.param.dtype)
        if self.rank_dim is None:
            self.param.copy_(value)
        else:  # zero-padded beyond the new rank
            self.param.zero_()
            self.param.narrow(self.rank_dim, 0, value.shape[self.rank_dim]).copy_(value)
        if self.branch is not None and self.planned is not None:
            _set_settings(self.branch, self.planned)


def _plan_swaps(
    model: nn.Module,
    info: Compiled,
    adapter: str,
    settings: LoraAdapter,
    state: dict[str, torch.Tensor],
    where: str,
) -> tuple[list[_Swap], list[LoraBranch]]:
    """Check the new adapter against the model; the writes to make and the layers it skips."""
    old = info.spec.adapters[adapter]
    for field in ("use_dora", "lora_bias", "lora_dropout"):
        if getattr(old, field) != getattr(settings, field):
            raise HotswapError(
                f"adapter {adapter!r}: the new adapter has {field}={getattr(settings, field)!r}, "
                f"the model {getattr(old, field)!r}; hotswapping cannot change it (load the "
                "adapter with adaptc.load_adapter instead)"
            )
    branches = {b.target: b for b in _branches(model) if b.adapter == adapter}
    layers = _layers(model, adapter)
    factors = {
        f"{PREFIX}{target}.{name}": (branch, param, RANK_DIMS.get(name))
        for target, branch in branches.items()
        for name, param in branch.named_parameters()
    }
    others = {k: t for k, t in adapter_tensors(model, adapter) if k not in factors}
    known = set(factors) | set(others)
    unexpected = sorted(set(state) - known)
    if unexpected:
        raise HotswapError(
            f"{where} does not fit adapter {adapter!r} of the model: {len(unexpected)} unexpected "
            f"key(s) (e.g. {', '.join(unexpected[:3])}); a hotswapped adapter may only target "
            "layers the model's adapter targets"
        )
    missing = sorted(set(others) - set(state))
    if missing:
        raise HotswapError(
            f"{where} lacks {len(missing)} tensor(s) adapter {adapter!r} has besides LoRA "
            f"factors (e.g. {', '.join(missing[:3])}); biases and modules_to_save must match"
        )
    swaps: list[_Swap] = []
    present: set[str] = set()
    for key, (branch, param, dim) in factors.items():
        if key not in state:
            continue
        present.add(branch.target)
        swaps.append(_Swap(branch, param, state[key], dim))
    for target in sorted(present):  # every factor of a targeted layer must be there
        for key, (branch, _, _) in factors.items():
            if branch.target == target and key not in state:
                raise AdapterKeyError(f"{where}: {key} is missing ({target} has other tensors)")
    if not present:
        raise HotswapError(
            f"{where} targets none of the layers of adapter {adapter!r} "
            f"(e.g. {', '.join(list(branches)[:3])})"
        )
    first: dict[str, _Swap] = {}
    for swap in swaps:
        assert swap.branch is not None
        _check_shape(swap, swap.branch, adapter, where)
        first.setdefault(swap.branch.target, swap)
    for target, swap in first.items():
        assert swap.branch is not None
        planned = _plan_target_of(layers[target], target, adapter, settings)
        _check_rank_and_scaling(swap.branch, planned, swaps, where)
        swap.planned = planned
    for key, tensor in others.items():  # biases, modules_to_save copies, base embeddings
        value = state[key]
        if tuple(value.shape) != tuple(tensor.shape):
            raise AdapterKeyError(
                f"{where}: {key} has shape {tuple(value.shape)}, the model {tuple(tensor.shape)}"
            )
        if is_base_tensor(key):
            if not torch.equal(value.to(tensor), tensor):  # shared with the user's model
                raise HotswapError(
                    f"{where}: {key} is a base weight and differs from the model's; hotswapping "
                    "never changes base weights (load the adapter with adaptc.load_adapter)"
                )
            continue
        swaps.append(_Swap(None, tensor, value, None))
    placeholders = [b for t, b in branches.items() if t not in present]
    return swaps, placeholders


def _check_factors(branches: list[LoraBranch]) -> None:
    """Every branch is one (A, B) pair (LoRA on nn.MultiheadAttention has two and refuses)."""
    for branch in branches:
        if isinstance(branch, ParameterLoraBranch):  # A has r·E rows: padding breaks experts
            raise HotswapError(
                f"{branch.target}: hotswapping adapters of a targeted parameter is not "
                "supported (target_parameters)"
            )
        try:
            branch.factors()
        except ValueError as exc:
            raise HotswapError(str(exc)) from None


def _check_shape(swap: _Swap, branch: LoraBranch, adapter: str, where: str) -> None:
    have, new, dim = tuple(swap.param.shape), tuple(swap.value.shape), swap.rank_dim
    grouped = _groups(branch) > 1  # a grouped convolution's rank cannot change (not padded)
    fits = len(have) == len(new) and all(
        h == n or (i == dim and n <= h and not grouped)
        for i, (h, n) in enumerate(zip(have, new, strict=True))
    )
    if fits:
        return
    if dim is not None and len(have) == len(new) and grouped:
        raise HotswapError(
            f"adapter {adapter!r}: {branch.target} is a convolution with groups="
            f"{_groups(branch)}; hotswapping cannot change its rank"
        )
    if dim is not None and len(have) == len(new) and new[dim] > have[dim]:
        prepared = SCALING_BUFFER in branch._buffers
        hint = (
            f"the model was prepared for rank at most {have[dim]}: call prepare_hotswap with "
            "a max_rank at least the largest rank you will swap in, before torch.compile"
            if prepared
            else f"the model's rank is {have[dim]}; {_PREPARE}"
        )
        raise HotswapError(
            f"adapter {adapter!r}: the new adapter has rank {new[dim]} at {branch.target}; {hint}"
        )
    raise AdapterKeyError(f"{where}: a tensor of {branch.target} has shape {new}, not {have}")


def _check_rank_and_scaling(
    branch: LoraBranch, target: PlannedTarget, swaps: list[_Swap], where: str
) -> None:
    planned = _lora(target)
    for swap in swaps:
        if swap.branch is branch and swap.rank_dim is not None:
            rank = swap.value.shape[swap.rank_dim] * (_groups(branch) if swap.rank_dim else 1)
            if rank != planned.r:
                raise AdapterKeyError(
                    f"{where}: the config gives {branch.target} rank {planned.r}, its tensors "
                    f"have rank {rank}"
                )
    if SCALING_BUFFER in branch._buffers:
        return
    if not math.isclose(planned.scaling, branch.scaling, rel_tol=1e-12, abs_tol=0.0):
        raise HotswapError(
            f"adapter {branch.adapter!r}: the new adapter scales {branch.target} by "
            f"{planned.scaling:g} (lora_alpha {planned.lora_alpha:g}, r {planned.r}), the model "
            f"by {branch.scaling:g}, a constant in its generated code; {_PREPARE}"
        )


def _plan_target_of(
    layer: nn.Module, target: str, adapter: str, settings: LoraAdapter
) -> PlannedTarget:
    kind = kind_of(layer, target)
    return plan_target(LORA, kind, layer, LORA.settings(kind, layer, target, adapter, settings))


def _lora(planned: PlannedTarget) -> BranchConfig:
    assert isinstance(planned.settings, BranchConfig)
    return planned.settings


# --- writing ----------------------------------------------------------------------------


def _set_settings(branch: LoraBranch, planned: PlannedTarget) -> None:
    settings = _lora(planned)
    branch.r = settings.r
    branch.lora_alpha = settings.lora_alpha
    branch.scaling = settings.scaling
    tensor = branch._buffers.get(SCALING_BUFFER)
    if tensor is not None:
        tensor.fill_(settings.scaling)


def _empty(model: nn.Module, branch: LoraBranch) -> None:
    """A layer the new adapter does not target: a zero update (rank 0, nothing saved)."""
    for name, param in branch.named_parameters():
        if name != "lora_magnitude_vector":
            param.zero_()
    if branch.variant == "dora":  # m = ‖W‖: DoRA of a zero update is the identity
        weight = _layers(model, branch.adapter)[branch.target].weight
        magnitude = branch.lora_magnitude_vector
        assert isinstance(weight, torch.Tensor) and isinstance(magnitude, torch.Tensor)
        w = weight.to(magnitude.dtype)  # as the forward computes the norm
        zero = torch.zeros_like(w)
        if isinstance(branch, DoraConvBranch):
            norm = conv_weight_norm(w, zero, 0.0)  # (1, out, 1, …)
        else:  # (out,), the weight stored (in, out) for Conv1D and embeddings
            norm = linear_weight_norm(w, zero.T if branch.fan_in_fan_out else zero, 0.0,
                                      branch.fan_in_fan_out)  # fmt: skip
        magnitude.copy_(norm.reshape(magnitude.shape))
    branch.r = 0


def _pad(branch: LoraBranch, rank: int) -> None:
    """Replace each factor shorter than ``rank`` by a zero-padded copy (a new parameter)."""
    for name, param in list(branch.named_parameters()):
        dim = RANK_DIMS.get(name)
        if dim is None or param.shape[dim] == rank:
            continue
        shape = list(param.shape)
        shape[dim] = rank
        padded = param.new_zeros(shape)
        padded.narrow(dim, 0, param.shape[dim]).copy_(param)
        owner_path, _, attr = name.rpartition(".")
        owner = branch.get_submodule(owner_path) if owner_path else branch
        # the same class: a frozen factor (MiCA's B) stays frozen
        owner._parameters[attr] = type(param)(padded, requires_grad=param.requires_grad)
        for size in (
            ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels")
        ):
            if owner is not branch and hasattr(owner, size):
                setattr(owner, size, rank)


def _scaling_tensor(branch: LoraBranch, value: float) -> torch.Tensor:
    like = next(iter(branch.parameters()))
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    return torch.tensor(value, dtype=dtype, device=like.device)


# --- lookups ----------------------------------------------------------------------------


def _info(model: nn.Module, what: str) -> Compiled:
    """The compiled state (:func:`adaptc.compiler.compiled`), with a hint for a model
    torch.compile wrapped before it was prepared."""
    if compiled_info(model) is None and _torch_compiled(model):
        raise HotswapError(f"{what}() must be called before torch.compile: {_PREPARE}")
    return compiled(model, f"{what}()")


def _torch_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or model.__dict__.get("_compiled_call_impl") is not None


def _check_names(info: Compiled, names: list[str]) -> None:
    for name in names:
        if name not in info.spec.adapters:
            raise CompileError(
                f"the model has no adapter {name!r} (has: {', '.join(info.spec.adapters)})"
            )


def _branches(model: nn.Module) -> list[LoraBranch]:
    return [m for m in model.modules() if isinstance(m, LoraBranch)]


def _layers(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    """The layer carrying each branch of ``adapter``, by the branch's target path."""
    out: dict[str, nn.Module] = {}
    for module in model.modules():
        child = module._modules.get(LORA.child_name(adapter))
        if isinstance(child, LoraBranch):
            out.setdefault(child.target, module)
    return out


def _groups(branch: LoraBranch) -> int:
    lora_B = branch._modules.get("lora_B")
    return int(getattr(lora_B, "groups", 1)) if lora_B is not None else 1


def _padded_rank(branch: LoraBranch) -> int:
    for name, param in branch.named_parameters():
        dim = RANK_DIMS.get(name)
        if dim is not None:
            return int(param.shape[dim])
    return branch.r
