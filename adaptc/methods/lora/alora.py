"""Activated LoRA (aLoRA, PEFT's ``alora_invocation_tokens``): a LoRA adapter that applies
only from its invocation tokens on.

For each sample of a batch an *offset* says how many of the last positions get the
update: the invocation sequence's last occurrence and everything after it (so the cache
of the tokens before it is the base model's and can be reused). The offsets are the
batch's, not the weights': :mod:`adaptc.adapters.alora` computes them from the input ids
and sets them on the aLoRA branches for a block; outside one (no offsets) the adapter
does nothing, as PEFT's. A position beyond a sample's offset is exactly the base output.

The branch is a plain LoRA branch (same weights and file keys) whose output passes a
:func:`activated_output` node::

    fc = self.fc(x)
    … add = fc + mul                                   # the plain LoRA sum
    activated_output = adaptc.methods.lora.alora.activated_output(fc, add, self.fc.lora_a)

Linear layers only (PEFT's rule), and never merged: the update depends on the position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from adaptc.methods.lora import variants
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.linear import make_linear_branch
from adaptc.methods.lora.rule import BranchConfig, LoraRule, Merged

__all__ = ["NAME", "OFFSETS", "activated_output", "activation_mask"]

NAME = "alora"
OFFSETS = "_adaptc_alora_offsets"  # key in an aLoRA branch's __dict__: the batch's offsets


def activation_mask(offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """True where the update applies: the last ``offsets[i]`` positions of sample ``i`` of
    ``out`` (``(batch, tokens, …)``, or ``(batch, features)``: one position)."""
    batch = out.shape[0]
    tokens = out.shape[1] if out.dim() == 3 else 1
    if offsets.shape != (batch,):
        raise ValueError(
            f"aLoRA: {offsets.numel()} offsets for a batch of {batch} (one per sample)"
        )
    offsets = offsets.to(out.device).clamp(max=tokens)
    positions = torch.arange(tokens, device=out.device).unsqueeze(0)
    mask = positions >= (tokens - offsets).unsqueeze(1)  # (batch, tokens)
    return mask.view(batch, tokens, 1) if out.dim() == 3 else mask.view(batch, 1)


def activated_output(base_out: Any, adapted: Any, branch: Any) -> Any:
    """``adapted`` where the branch's adapter is active (its offsets), ``base_out`` elsewhere
    (everywhere when no offsets are set). Called with fx proxies (fx traces the generated
    code again, e.g. when a graph module is unpickled), it records itself as one node."""
    if isinstance(base_out, fx.Proxy):
        return base_out.tracer.create_proxy(
            "call_function", activated_output, (base_out, adapted, branch), {}
        )
    offsets = branch.__dict__.get(OFFSETS)
    if offsets is None:
        return base_out
    return torch.where(activation_mask(offsets, base_out), adapted, base_out)


class ActivatedLinear(variants.Variant):
    """aLoRA on ``nn.Linear`` and ``Conv1D``."""

    title = "aLoRA"

    def make_branch(
        self, rule: LoraRule, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        branch, replaced = make_linear_branch(rule, module, cfg)
        branch.variant = NAME
        return branch, replaced

    def emit(
        self,
        rule: LoraRule,
        graph: fx.Graph,
        x: fx.Node,
        base_out: fx.Node,
        *,
        base: nn.Module,
        base_path: str,
        branch: LoraBranch,
        branch_path: str,
    ) -> fx.Node:
        adapted = rule.emit_plain(
            graph, x, base_out, base=base, base_path=base_path, branch=branch,
            branch_path=branch_path,
        )  # fmt: skip
        with graph.inserting_after(adapted):
            holder = graph.get_attr(branch_path)
        with graph.inserting_after(holder):
            return graph.call_function(activated_output, (base_out, adapted, holder))

    def merge(
        self, rule: LoraRule, module: nn.Module, branch: LoraBranch, weight: torch.Tensor
    ) -> Merged:
        raise ValueError(
            f"{branch.target}: adapter {branch.adapter!r} is an aLoRA adapter (active only "
            "after its invocation tokens): it cannot be merged into the weights"
        )


variants.register(NAME, ("nn.Linear", "transformers.Conv1D"), ActivatedLinear())
