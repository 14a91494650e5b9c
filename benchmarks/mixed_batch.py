"""Mixed-adapter batches: one batch over 8 adapters vs the same batch on one adapter, and vs
PEFT's ``adapter_names``.

Usage: python benchmarks/mixed_batch.py [--quick] [--device cpu|cuda] [--dtype fp32|bf16]
                                        [--json PATH]

The model is Llama-style (q/k/v/o + MLP targets, r 16; the adapters' ranks vary 8..32 so
padding is exercised), the same weights in adaptc and peft. Two regimes: a prefill
forward (seq 128) and a decode step (seq 1), batch 8, one sample per adapter. Prints one
JSON object per regime: medians in seconds and

- ``mixed_vs_single``: adaptc mixed / adaptc single-adapter on the same batch (target ≤ 1.3)
- ``peft_vs_mixed``: peft mixed / adaptc mixed (target ≥ 2)

and the largest logit difference to each sample run alone with its adapter, and to
PEFT's output. (In bf16 PEFT's mixed path adds each LoRA term in bf16, its single-adapter
path in float32, so PEFT's two disagree by bf16 rounding; adaptc's mixed path does what
its single path does.)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import peft
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cases import Settings, median_time

import adaptc
from adaptc.adapters.mixed import mixed_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 8


def build(
    device: str, dtype: torch.dtype, hidden: int | None = None, layers: int | None = None
) -> tuple[Any, Any, list[str]]:
    """adaptc's and peft's models with the same 8 adapters (ranks 8..32) on one base."""
    cuda = device == "cuda"
    hidden = hidden or (2048 if cuda else 512)
    cfg = tf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers or (16 if cuda else 4),
        num_attention_heads=16 if cuda else 8,
        num_key_value_heads=16 if cuda else 8,
        vocab_size=32000 if cuda else 8000,
    )
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: fast on a GPU
        base = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    ranks = [8, 16, 32, 16, 8, 16, 32, 16]
    spec = {
        "version": 1,
        "adapters": {
            n: {
                "r": r,
                "lora_alpha": 2 * r,
                "init": "random",
                "targets": {"kind": "names", "names": TARGETS},
            }
            for n, r in zip(names, ranks, strict=True)
        },
    }
    ours = adaptc.compile(base, spec).eval()
    theirs: Any = None
    for n, r in zip(names, ranks, strict=True):
        config = peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False
        )
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=n)
        else:
            theirs.add_adapter(n, config)
    theirs.eval()
    # the same adapter weights in both
    from adaptc.adapters.keys import adapter_tensors

    state = theirs.state_dict()
    with torch.no_grad():
        for n in names:
            for key, tensor in adapter_tensors(ours, n):
                for part in ("lora_A", "lora_B"):
                    key = key.replace(f".{part}.weight", f".{part}.{n}.weight")
                tensor.copy_(state[key])
    return ours, theirs, names


def measure(
    ours: Any, theirs: Any, names: list[str], seq: int, repeat: int, warmup: int, device: str
) -> dict[str, Any]:
    """Medians for one batch of 8 samples (one per adapter) of length ``seq``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, ours.config.vocab_size, (N_ADAPTERS, seq), generator=g).to(device)
    ids = torch.arange(N_ADAPTERS, device=device)

    def timed(model: Any, **kw: Any) -> float:
        settings = Settings(repeat=repeat, warmup=warmup, device=device)
        return median_time(lambda: model(input_ids=x, **kw), settings)

    with torch.no_grad():
        adaptc.set_active(ours, [names[1]])
        single = timed(ours)
        with mixed_batch(ours, ids):
            mixed = timed(ours)
            check = ours(input_ids=x).logits.float()
        theirs.set_adapter(names[1])
        peft_single = timed(theirs)
        peft_mixed = timed(theirs, adapter_names=names)
        ref = theirs(input_ids=x, adapter_names=names).logits.float()
        alone = []
        for i, name in enumerate(names):  # each sample run alone with its adapter
            adaptc.set_active(ours, [name])
            alone.append(ours(input_ids=x[i : i + 1]).logits.float())
    return {
        "regime": "decode" if seq == 1 else "prefill",
        "batch": N_ADAPTERS,
        "seq": seq,
        "device": device,
        "dtype": str(check.dtype).removeprefix("torch."),
        "adaptc_single_s": single,
        "adaptc_mixed_s": mixed,
        "peft_single_s": peft_single,
        "peft_mixed_s": peft_mixed,
        "mixed_vs_single": mixed / single,
        "peft_vs_mixed": peft_mixed / mixed,
        "max_abs_diff": float((check - ref).abs().max()),
        "max_abs_diff_vs_each_alone": float((check - torch.cat(alone)).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    repeat, warmup = (5, 1) if args.quick else (15, 3)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours, theirs, names = build(args.device, dtype)
    results = []
    for seq in (128, 1):
        result = measure(ours, theirs, names, seq, repeat, warmup, args.device)
        result["dtype"] = args.dtype
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
