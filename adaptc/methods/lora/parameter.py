"""LoRA on a parameter (PEFT's ``target_parameters``, ``lora.ParamWrapper``).

For a 3-D expert stack ``W`` of ``E`` experts the factors are PEFT's: ``lora_A`` is
``nn.Linear(in, r·E)`` and ``lora_B`` ``nn.Linear(r·E, out)``; expert ``e`` uses rows
``e·r … e·r + r − 1`` of ``A`` and columns ``j·E + e`` of ``B``, so
``W[e] ↦ W[e] + s·B_e·A_e`` (stored the parameter's way round). The update is added to
the parameter where its module reads it, as one ``baddbmm`` over the experts; nothing of
the size of ``W`` is kept beyond what the module's forward needs. A 2-D parameter
``(out, in)`` is a one-expert case: ``W + s·B·A``.

As in PEFT the branch has no dropout (the input cannot be factored out of
``B·A·dropout(x)``), no ``lora_bias``, no variant, no ``fan_in_fan_out`` and no init that
reads the base weight: the spec refuses them (``target_parameters``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import fx, nn

from adaptc.layers import ParameterSlot
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.init import init_factors
from adaptc.methods.lora.rule import BranchConfig, LoraRule, Merged, adapter_dtype, round_as_peft

__all__ = ["ParameterLoraBranch", "ParameterRule", "add_update", "delta"]


class ParameterLoraBranch(LoraBranch):
    """A LoRA branch on a parameter. ``nested_path`` is where PEFT's file keeps its tensors:
    the module's path, with one ``.base_layer`` per parameter of the same module the
    adapter targets after this one (PEFT nests one wrapper per parameter, in the module's
    parameter order, the first innermost)."""

    nested_path: str = ""  # set by the compiler (adaptc.compiler.parameters)

    @property
    def file_path(self) -> str:
        return self.nested_path or self.target

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.named_parameters()  # never padded: A has r·E rows


class ParameterRule(LoraRule):
    """``W ↦ W + s·ΔW`` on a :class:`~adaptc.layers.ParameterSlot`."""

    batch_form = "parameter"  # no mixed-batch kernel: refused by adaptc.adapters.mixed

    def make_plain_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        assert isinstance(module, ParameterSlot)
        fan_in, fan_out = module.in_out
        experts = module.num_experts
        kw = {"device": module.device, "dtype": adapter_dtype(torch.empty((), dtype=module.dtype))}
        # built as PEFT builds them, so the same seed draws the same factors
        lora_A = nn.Linear(fan_in, cfg.r * experts, bias=False, **kw)
        lora_B = nn.Linear(cfg.r * experts, fan_out, bias=False, **kw)
        if module.device.type != "meta":  # random: the layers' own init (PEFT's False)
            with torch.no_grad():
                if cfg.init == "gaussian":  # std 1/r of the adapter's rank, not r·E
                    nn.init.normal_(lora_A.weight, std=1 / cfg.r)
                    nn.init.zeros_(lora_B.weight)
                elif cfg.init == "default":
                    init_factors(lora_A.weight, lora_B.weight, None, init="default", scaling=1.0)
            round_as_peft(module.dtype, lora_A.weight, lora_B.weight)
        branch = ParameterLoraBranch(
            lora_A,
            lora_B,
            scaling=cfg.scaling,
            dropout=0.0,
            adapter=cfg.adapter,
            target=cfg.target,
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
        )
        return branch, {}

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
        """``W + s·ΔW`` after the slot's call on ``W``.

        Before (the graph of a mixture-of-experts module whose ``gate_up_proj`` is
        targeted; :mod:`adaptc.compiler.parameters`)::

            base_layer_gate_up_proj = self.base_layer.gate_up_proj
            slot = self.adapted_parameters.gate_up_proj(base_layer_gate_up_proj)

        After (r 8, lora_alpha 16, 4 experts, stored (experts, out, in))::

            slot = self.adapted_parameters.gate_up_proj(base_layer_gate_up_proj)
            a = self.adapted_parameters.gate_up_proj.lora_default.lora_A.weight
            b = self.adapted_parameters.gate_up_proj.lora_default.lora_B.weight
            add_update = adaptc_methods_lora_parameter_add_update(slot, a, b, 2.0, 4, False)
        """
        assert isinstance(base, ParameterSlot)
        with graph.inserting_before(base_out.next):
            A = graph.get_attr(f"{branch_path}.lora_A.weight")
            B = graph.get_attr(f"{branch_path}.lora_B.weight")
            args = (base_out, A, B, branch.scaling, base.num_experts, base.is_transposed)
            return graph.call_function(add_update, args)

    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        assert isinstance(module, ParameterSlot)
        A, B = branch.factors()
        return delta(A, B, branch.scaling, module.num_experts, module.is_transposed, module.shape)

    def merge_plain(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        assert isinstance(module, ParameterSlot)
        A, B = branch.factors()
        args = (branch.scaling, module.num_experts, module.is_transposed)
        return Merged(add_update(weight, A, B, *args))


def _factors(
    A: torch.Tensor, B: torch.Tensor, experts: int, transposed: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lhs, rhs)`` with ``ΔW[e] = lhs[e] @ rhs[e]`` in the parameter's layout."""
    A_e = A.reshape(experts, -1, A.shape[-1])  # (E, r, in)
    B_e = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
    if transposed:  # stored (E, in, out)
        return A_e.transpose(-2, -1).to(dtype), B_e.transpose(-2, -1).to(dtype)
    return B_e.to(dtype), A_e.to(dtype)


def add_update(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    experts: int,
    transposed: bool,
) -> torch.Tensor:
    """``weight + scaling · ΔW`` (the graph's node; one ``baddbmm`` for an expert stack)."""
    if weight.dim() == 2:
        return weight + ((B @ A) * scaling).to(weight.dtype)
    lhs, rhs = _factors(A, B, experts, transposed, weight.dtype)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return torch.baddbmm(weight, lhs, rhs, alpha=scaling)


def delta(
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    experts: int,
    transposed: bool,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """``scaling · ΔW`` of the parameter's ``shape`` (in the factors' dtype)."""
    if len(shape) == 2:
        return (B @ A) * scaling
    lhs, rhs = _factors(A, B, experts, transposed, A.dtype)
    return torch.bmm(lhs, rhs) * scaling
