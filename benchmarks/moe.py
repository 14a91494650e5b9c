"""One LoRA train step on a mixture of experts, adaptc against peft (``target_parameters``).

A Qwen3-MoE built from a config (4 layers, hidden 256, 8 experts of 256, 2 per token),
LoRA r 16 on q/v and on both fused expert stacks; forward and backward on 4 x 64 tokens,
one thread, the libraries alternating; prints the medians and adaptc / peft.

    .venv/bin/python benchmarks/moe.py
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import peft
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import adaptc

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        num_experts=8, num_experts_per_tok=2, vocab_size=1000,
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    adapter = {"r": 16, "lora_alpha": 32, "target_parameters": EXPERTS,
               "targets": {"kind": "names", "names": ["q_proj", "v_proj"]}}  # fmt: skip
    ours = adaptc.compile(base, {"version": 1, "adapters": {"default": adapter}})
    lora = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), lora)
    ids = torch.randint(0, 1000, (4, 64))

    def step(model: nn.Module) -> float:
        start = time.perf_counter()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None
        return time.perf_counter() - start

    for model in (ours, theirs, ours, theirs):  # warm up
        step(model)
    times: dict[str, list[float]] = {"adaptc": [], "peft": []}
    for _ in range(8):
        times["adaptc"].append(step(ours))
        times["peft"].append(step(theirs))
    a, p = statistics.median(times["adaptc"]), statistics.median(times["peft"])
    print(f"moe-train-step: adaptc {a * 1e3:.1f} ms, peft {p * 1e3:.1f} ms, ratio {a / p:.2f}")


if __name__ == "__main__":
    main()
