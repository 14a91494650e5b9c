"""AdaLoRA's rank allocator and orthogonal regulariser, as peft 0.21.2's ``RankAllocator``
and ``AdaLoraModel.update_and_allocate`` / ``forward`` compute them.

Importance of every entry of ``A``, ``E``, ``B`` is ``|p·∇p|``, smoothed (``beta1``) and its
uncertainty tracked (``beta2``); a triplet's score is ``s(E_i) + mean_j s(A_ij) +
mean_k s(B_ki)``; the budget falls cubically from the initial total rank to ``target_r``
per layer between ``tinit`` and ``total_step - tfinal``, and the triplets at or below the
score ranked ``init_budget - budget`` have ``E`` zeroed. Branches are handled by duck
type (``lora_A``, ``lora_E``, ``lora_B``, ``target``, ``rank_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["AdaLoraState", "budget_schedule", "orthogonal_regulariser", "update_and_allocate"]

_FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclass
class AdaLoraState:
    """One AdaLoRA adapter's allocator state on a compiled model."""

    adapter: str
    spec: Any  # the AdaLoraAdapter (its schedule)
    hook: RemovableHandle | None = None
    ipt: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    exp_avg_unc: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    rank_pattern: dict[str, tuple[bool, ...]] | None = None
    budget: int | None = None  # the latest step's budget

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}


def orthogonal_regulariser(branches: list[Any]) -> torch.Tensor | float:
    """Mean over the branches' ``A`` and ``B`` of ``‖AAᵀ − I‖_F`` / ``‖BᵀB − I‖_F``."""
    total: torch.Tensor | float = 0
    count = 0
    for branch in branches:
        for name in ("lora_A", "lora_B"):
            p = getattr(branch, name)
            cov = p @ p.T if name == "lora_A" else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return total / count if count else 0


def budget_schedule(spec: Any, init_bgt: int, target_bgt: int, step: int) -> tuple[int, bool]:
    """``(budget, mask now)`` at ``step`` (PEFT's ``RankAllocator.budget_schedule``)."""
    tinit, tfinal, total = spec.tinit, spec.tfinal, spec.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % spec.deltaT == 0


def _update_ipt(state: AdaLoraState, branches: list[Any]) -> None:
    b1, b2 = state.spec.beta1, state.spec.beta2
    for branch in branches:
        for name in _FACTORS:
            p = getattr(branch, name)
            key = (branch.target, name)
            if key not in state.ipt:
                state.ipt[key] = torch.zeros_like(p)
                state.exp_avg_ipt[key] = torch.zeros_like(p)
                state.exp_avg_unc[key] = torch.zeros_like(p)
            if p.grad is None:
                raise ValueError(
                    f"{branch.target}: {name} has no gradient: call update_and_allocate after "
                    "loss.backward() and before zero_grad()"
                )
            with torch.no_grad():
                ipt = (p * p.grad).abs().detach()
                state.ipt[key] = ipt
                avg = b1 * state.exp_avg_ipt[key] + (1 - b1) * ipt
                state.exp_avg_ipt[key] = avg
                state.exp_avg_unc[key] = b2 * state.exp_avg_unc[key] + (1 - b2) * (ipt - avg).abs()


def _score(state: AdaLoraState, key: tuple[str, str]) -> torch.Tensor:
    return state.exp_avg_ipt[key] * state.exp_avg_unc[key]


def _mask_to_budget(
    state: AdaLoraState, branches: list[Any], init_bgt: int, budget: int
) -> dict[str, tuple[bool, ...]]:
    triplets: dict[str, torch.Tensor] = {}
    for branch in branches:
        t = branch.target
        ipt_a = torch.mean(_score(state, (t, "lora_A")), dim=1, keepdim=True)
        ipt_b = torch.mean(_score(state, (t, "lora_B")), dim=0, keepdim=False).view(-1, 1)
        ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
        triplets[t] = (_score(state, (t, "lora_E")).view(-1) + ipt_ab.view(-1)).view(-1, 1)
    scores = torch.cat([s.view(-1) for s in triplets.values()])
    threshold = torch.kthvalue(scores, k=init_bgt - budget)[0].item()
    pattern: dict[str, tuple[bool, ...]] = {}
    with torch.no_grad():
        for branch in branches:
            drop = triplets[branch.target] <= threshold
            branch.lora_E.masked_fill_(drop, 0.0)
            pattern[branch.target] = tuple(bool(v) for v in (~drop).view(-1).tolist())
    return pattern


def _mask_using_rank_pattern(branches: list[Any], pattern: dict[str, tuple[bool, ...]]) -> None:
    with torch.no_grad():
        for branch in branches:
            mask = torch.tensor(pattern[branch.target], device=branch.lora_E.device)
            branch.lora_E.masked_fill_(~mask.unsqueeze(-1), 0.0)


def update_and_allocate(
    state: AdaLoraState, branches: list[Any], global_step: int
) -> dict[str, tuple[bool, ...]] | None:
    """One step of PEFT's ``AdaLoraModel.update_and_allocate``: update the importance
    scores, mask ``E`` to the step's budget; returns the new rank pattern when it changed."""
    spec = state.spec
    init_bgt = sum(int(b.lora_A.shape[0]) for b in branches)
    target_bgt = spec.target_r * len(branches)
    end = spec.total_step - spec.tfinal
    new: dict[str, tuple[bool, ...]] | None = None
    if global_step <= end:
        if global_step < end:
            _update_ipt(state, branches)
        budget, mask_now = budget_schedule(spec, init_bgt, target_bgt, global_step)
        state.budget = budget
        if mask_now or global_step == end:
            new = _mask_to_budget(state, branches, init_bgt, budget)
            state.rank_pattern = new
        if global_step == end:
            state.reset_ipt()
    elif state.rank_pattern is not None:
        state.budget = target_bgt
        _mask_using_rank_pattern(branches, state.rank_pattern)
    if new is not None:
        for branch in branches:
            branch.rank_mask = new[branch.target]
    return new
