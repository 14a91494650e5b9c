"""Compile time on the meta device: adaptc.compile vs peft.get_peft_model, all-linear r 16.

Usage: python benchmarks/compile_meta.py [--shapes 7b 70b] [--repeat 3]
Prints one JSON line per shape: medians in seconds and the ratio adaptc / peft.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import transformers as tf

import adaptc

SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
}
SPEC = {
    "version": 1,
    "task_type": "CAUSAL_LM",
    "adapters": {"default": {"r": 16, "lora_alpha": 32, "targets": {"kind": "all-linear"}}},
}


def meta_model(shape: str) -> torch.nn.Module:
    with torch.device("meta"):
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPES[shape]))


def time_adaptc(model: torch.nn.Module) -> float:
    start = time.perf_counter()
    adaptc.compile(model, SPEC)
    return time.perf_counter() - start


def time_peft(model: torch.nn.Module) -> float:
    import peft

    config = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    twin = copy.deepcopy(model)  # peft rewrites in place
    start = time.perf_counter()
    peft.get_peft_model(twin, config)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for shape in args.shapes:
        model = meta_model(shape)
        ours = statistics.median(time_adaptc(model) for _ in range(args.repeat))
        row = {"name": f"compile-meta-{shape}", "unit": "s", "adaptc": round(ours, 3)}
        if not args.no_peft:
            theirs = statistics.median(time_peft(model) for _ in range(args.repeat))
            row |= {"peft": round(theirs, 3), "ratio": round(ours / theirs, 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
