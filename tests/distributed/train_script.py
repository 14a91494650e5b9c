"""Train a LoRA adapter compiled by adaptc on several processes, then save it from rank 0.

Launched by ``torchrun``/``python -m torch.distributed.run`` or ``accelerate launch`` (two
CPU processes, gloo), or imported and called with ``world == 1`` as the single-process
reference (``train(kind, "none", ...)``)::

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/train_script.py \\
        --models mlp llama --wrap fsdp --out out/
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/train_script.py \\
        --models mlp llama --wrap accelerate --out out/

Every rank builds the same base model (same seed), compiles the same spec, and takes its
contiguous slice of each global batch. DDP averages gradients across ranks, FSDP2
reduce-scatters them, so ``world`` ranks on ``B / world`` rows each take the same step as
one process on all ``B`` rows. The script checks what must hold on every rank (frozen base,
only the adapter trains, the loss goes down, the adapters agree across ranks) and exits
non-zero with a one-line message when something does not.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import adaptc
from adaptc.adapters.keys import adapter_state_dict

GLOBAL_BATCH = 8
SEQ = 8
VOCAB = 64
LR = 1e-2

SPECS: dict[str, dict[str, Any]] = {
    "mlp": {
        "version": 1,
        "adapters": {
            "default": {
                "r": 4,
                "lora_alpha": 8,
                "targets": {"kind": "names", "names": ["fc1", "fc2"]},
            }
        },
    },
    "llama": {
        "version": 1,
        "task_type": "CAUSAL_LM",
        "adapters": {"default": {"r": 4, "lora_alpha": 8, "targets": {"kind": "all-linear"}}},
    },
}


class MLP(nn.Module):
    """A small regression MLP: a custom model that adaptc traces whole."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def build_base(kind: str) -> nn.Module:
    """The same base model on every rank (and in the reference run)."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def batch(kind: str, step: int) -> dict[str, torch.Tensor]:
    """Global batch ``step``: the same rows in every process, drawn from a fixed task."""
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "mlp":
        x = torch.randn(GLOBAL_BATCH, 16, generator=g)  # (B, 16)
        y = torch.sin(x[:, :4].sum(-1, keepdim=True))  # (B, 1)
        return {"x": x, "y": y}
    # four fixed sequences to memorise, each row one of them
    patterns = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))
    rows = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    return {"input_ids": patterns[rows]}  # (B, T)


def loss_of(kind: str, model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "mlp":
        return nn.functional.mse_loss(model(data["x"]), data["y"])
    ids = data["input_ids"]
    return model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


def shard(data: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = GLOBAL_BATCH // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in data.items()}


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"rank {int(os.environ.get('RANK', 0))}: {message}")


def train(kind: str, wrap: str, steps: int, out: Path | None) -> dict[str, Any]:
    """Train on this process's shard; returns losses. Saves the adapter to ``out`` (rank 0).

    ``wrap`` is ``ddp`` (DistributedDataParallel), ``fsdp`` (FSDP2's ``fully_shard``),
    ``accelerate`` (``Accelerator.prepare``, which wraps in DDP on several processes) or
    ``none``; without a process group every mode runs as one process on the whole batch.
    """
    accelerator = None
    if wrap == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # joins the process group `accelerate launch` made
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    check(GLOBAL_BATCH % world == 0, f"world size {world} does not divide {GLOBAL_BATCH}")
    base = build_base(kind)
    base_before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    compiled = adaptc.compile(base, SPECS[kind])
    compiled.train()

    adapter_names = {n for n, p in compiled.named_parameters() if ".lora_" in f".{n}"}
    trainable = {n for n, p in compiled.named_parameters() if p.requires_grad}
    check(bool(adapter_names), "no adapter parameters")
    check(trainable == adapter_names, f"trainable != adapter: {sorted(trainable ^ adapter_names)}")

    model: nn.Module = compiled
    if wrap == "ddp" and distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(compiled)
    elif wrap == "fsdp" and distributed:
        from torch.distributed.fsdp import fully_shard

        if kind == "llama":  # one FSDP unit per decoder layer, then the root
            for layer in compiled.model.layers:  # type: ignore[union-attr]
                fully_shard(layer)
        fully_shard(compiled)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    if accelerator is not None:
        model, optimizer = accelerator.prepare(compiled, optimizer)

    losses: list[float] = []
    for step in range(steps):
        loss = loss_of(kind, model, shard(batch(kind, step), rank, world))
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        if distributed:  # the global batch's loss, as the single process sees it
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    late = sum(losses[-3:]) / len(losses[-3:])  # the last steps' mean, against the first
    check(late < 0.9 * losses[0], f"the loss did not go down: {losses[0]:.4f} -> {late:.4f}")

    still_trainable = {n for n, p in compiled.named_parameters() if p.requires_grad}
    check(still_trainable == trainable, "the set of trainable parameters changed while training")
    for key, value in base.state_dict().items():
        check(torch.equal(value, base_before[key]), f"base weight {key} changed")
    check(
        all(p.requires_grad for p in base.parameters()),
        "the original model's requires_grad flags changed",
    )

    if accelerator is not None:
        saveable = accelerator.unwrap_model(model)  # the adaptc model DDP wrapped
    elif wrap == "fsdp" and distributed:
        saveable = unsharded(compiled, base, kind)
    else:
        saveable = compiled
    adapter = adapter_state_dict(saveable, "default")
    if distributed:
        flat = torch.cat([adapter[k].flatten().float() for k in sorted(adapter)])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        for other, tensor in enumerate(gathered):
            check(torch.equal(tensor, flat), f"adapter of rank {other} differs from rank {rank}")
    if rank == 0 and out is not None:
        adaptc.save_adapter(saveable, out)
        (out / "losses.json").write_text(json.dumps(losses), encoding="utf-8")
    return {"losses": losses, "adapter": adapter}


def unsharded(compiled: nn.Module, base: nn.Module, kind: str) -> nn.Module:
    """A plain compiled model holding the FSDP2 model's full adapter (a collective).

    ``get_model_state_dict`` gathers every trainable DTensor shard into a full tensor, keyed
    by the compiled model's own parameter paths (FSDP2 keeps them), so it loads straight
    into a fresh ``adaptc.compile`` of the same base and spec, which shares the base weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    full = get_model_state_dict(compiled, options=options)
    fresh = adaptc.compile(base, SPECS[kind])
    missing, unexpected = fresh.load_state_dict(full, strict=False)
    lora_missing = [k for k in missing if ".lora_" in f".{k}"]
    check(not lora_missing and not unexpected, f"state dict mismatch: {lora_missing}{unexpected}")
    return fresh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=["mlp"])
    parser.add_argument("--wrap", choices=["ddp", "fsdp", "accelerate", "none"], default="ddp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="rank 0 saves to OUT/<model>")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.wrap != "accelerate" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("gloo")  # Accelerator() makes its own
    try:
        for kind in args.models:
            out = args.out / kind if args.out is not None else None
            losses = train(kind, args.wrap, args.steps, out)["losses"]
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"{kind} {args.wrap}: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written the adapters before anyone leaves
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
