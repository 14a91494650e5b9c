"""Merging in place and back: how far the weights drift from the originals, peft vs adaptc.

Usage: python benchmarks/unmerge_drift.py [--rounds N] [--dtype bf16|fp16|fp32]

A Llama-shaped decoder layer's projections (hidden 1024, MLP 2816; q/k/v/o + gate/up/down
targets, r 16, the same trained adapter in both), ``merge_adapter()`` then
``unmerge_adapter()`` ``--rounds`` times (as a training loop that evaluates merged does).
Prints one JSON object: the largest absolute difference of any target weight to its
original for peft and adaptc, the time of one merge + unmerge, and the memory adaptc holds
while merged (the merged weights beside the originals).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import peft
import torch
import transformers

import adaptc.peft as ap

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=128,
    )  # fmt: skip
    base = transformers.AutoModelForCausalLM.from_config(config).to(DTYPES[args.dtype]).eval()
    lora = {"r": 16, "lora_alpha": 32, "target_modules": TARGETS, "init_lora_weights": False}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
    mine = ap.get_peft_model(base, ap.LoraConfig(**lora))
    state = peft.get_peft_model_state_dict(theirs)
    ap.set_peft_model_state_dict(mine, state)
    result: dict[str, object] = {"dtype": args.dtype, "rounds": args.rounds}
    for name, model in (("peft", theirs), ("adaptc", mine)):
        weights = {
            n: p for n, p in model.named_parameters() if n.endswith(".weight") and "lora" not in n
            and any(t in n for t in TARGETS)
        }  # fmt: skip
        before = {n: p.detach().clone() for n, p in weights.items()}
        start = time.perf_counter()
        for _ in range(args.rounds):
            model.merge_adapter()
            model.unmerge_adapter()
        seconds = (time.perf_counter() - start) / args.rounds
        now = {n: p for n, p in model.named_parameters() if n in before}
        drift = max((now[n].float() - before[n].float()).abs().max().item() for n in before)
        result[name] = {"max_abs_drift": drift, "merge_unmerge_s": round(seconds, 4)}
    mine.merge_adapter()
    held = sum(
        p.numel() * p.element_size() for n, p in mine.named_parameters()
        if any(t in n for t in TARGETS) and "lora" not in n and n.endswith(".weight")
    )  # fmt: skip
    result["adaptc"]["held_while_merged_MiB"] = round(held / 2**20, 1)  # type: ignore[index]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
