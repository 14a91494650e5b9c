"""``compile:``: how the compiler builds a model's graphs for training.

Each option switches one graph pass (:mod:`adaptc.compiler.training`). Every pass is
exact: the outputs and gradients of an optimised model are those of the unoptimised one
(bit for bit in float32 on the CPU, except ``fuse_siblings``, whose fused matmul sums in
another order, and ``fuse_add`` with a scaling that is not a power of two, which scales a
product before rounding it: both stay within PEFT's parity tolerance). They change what a
training step keeps for backward and how many kernels it launches, never what it computes.
``dropout`` and ``rematerialize`` are on by default; ``fuse_siblings`` (not bit-identical)
and ``fuse_add`` (no gain measured on the CPU) are off.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool

from adaptc.spec.fields import closed

__all__ = ["CompileOptions"]


class CompileOptions(BaseModel):
    """Graph passes for training and unmerged inference, each exact; the bit-identical ones
    that pay (``dropout``, ``rematerialize``) are on by default."""

    model_config = closed()
    dropout: Literal["auto", "regenerate", "mask", "save"] = Field(
        default="auto",
        description="What a LoRA branch with `lora_dropout` keeps for backward (dropout and "
        "`lora_A` run as one autograd function, which keeps the layer's input, shared with "
        "its siblings, instead of a dropped copy per target): `regenerate` saves the random "
        "generator's state and draws the same mask again in backward; `mask` keeps the mask "
        "as booleans (1 byte per element); `auto` is `regenerate` on CUDA/XPU (a cheap "
        "draw) and `mask` elsewhere; `save` keeps the dropped copy and the float mask per "
        "target, as PEFT does. All draw the same masks as PEFT.",
    )
    rematerialize: StrictBool = Field(
        default=True,
        description="In traced blocks, recompute cheap element-wise activations (an MLP's "
        "`silu(gate) * up`, GELU's chain) in backward instead of saving them, where that "
        "saves fewer tensors (the block's `gate` and `up` instead of four intermediates).",
    )
    fuse_siblings: StrictBool = Field(
        default=False,
        description="LoRA `A` factors of targets that read the same input in one traced "
        "graph (an MLP's `gate_proj` and `up_proj`) run as one matmul over the "
        "concatenated factors, forward and backward; the factors stay separate parameters "
        "(same state dict, same files). Not bit-identical: the fused matmul sums in "
        "another order (within PEFT's parity tolerance), so off by default.",
    )
    fuse_add: StrictBool = Field(
        default=False,
        description="Unmerged inference (no gradients recorded): each LoRA branch's `lora_B` "
        "matmul, scaling and add into the layer's output run as one `addmm` (from 64 rows "
        "on); and the branches' linear layers are called as functions (`F.linear`, bit for "
        "bit the same) unless a hook is registered. Training runs the same operations as "
        "without it. Off by default: no gain measured on the CPU (docs/training-passes.md).",
    )
