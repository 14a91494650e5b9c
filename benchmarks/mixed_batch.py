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
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adaptc
from adaptc.compiler.mixed import mixed_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 8


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeat: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(args: argparse.Namespace) -> tuple[Any, Any, torch.nn.Module, list[str]]:
    cuda = args.device == "cuda"
    cfg = tf.LlamaConfig(
        hidden_size=2048 if cuda else 512,
        intermediate_size=5632 if cuda else 1408,
        num_hidden_layers=16 if cuda else 4,
        num_attention_heads=16 if cuda else 8,
        num_key_value_heads=16 if cuda else 8,
        vocab_size=32000 if cuda else 8000,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = tf.LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()
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
    from adaptc.io.keys import adapter_tensors

    state = theirs.state_dict()
    with torch.no_grad():
        for n in names:
            for key, tensor in adapter_tensors(ours, n):
                for part in ("lora_A", "lora_B"):
                    key = key.replace(f".{part}.weight", f".{part}.{n}.weight")
                tensor.copy_(state[key])
    return ours, theirs, base, names


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
    ours, theirs, _, names = build(args)
    vocab = ours.config.vocab_size
    results = []
    for regime, seq in (("prefill", 128), ("decode", 1)):
        g = torch.Generator().manual_seed(1)
        x = torch.randint(1, vocab, (N_ADAPTERS, seq), generator=g).to(args.device)
        ids = torch.arange(N_ADAPTERS, device=args.device)

        def run(model: Any, x: torch.Tensor = x, **kw: Any) -> Any:
            return model(input_ids=x, **kw)

        def timed(model: Any, **kw: Any) -> float:
            return median_time(lambda: run(model, **kw), repeat, warmup, args.device)

        with torch.no_grad():
            adaptc.set_active(ours, [names[1]])
            single = timed(ours)
            with mixed_batch(ours, ids):
                mixed = timed(ours)
                check = run(ours).logits
            theirs.set_adapter(names[1])
            peft_single = timed(theirs)
            peft_mixed = timed(theirs, adapter_names=names)
            ref = run(theirs, adapter_names=names).logits
        tol = 1e-3 if args.dtype == "fp32" else 5e-2
        same = torch.allclose(check.float(), ref.float(), atol=tol, rtol=tol)
        row = {
            "regime": regime,
            "batch": N_ADAPTERS,
            "seq": seq,
            "device": args.device,
            "dtype": args.dtype,
            "adaptc_single_s": single,
            "adaptc_mixed_s": mixed,
            "peft_single_s": peft_single,
            "peft_mixed_s": peft_mixed,
            "mixed_vs_single": mixed / single,
            "peft_vs_mixed": peft_mixed / mixed,
            "outputs_match_peft": same,
            "max_abs_diff": float((check.float() - ref.float()).abs().max()),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
