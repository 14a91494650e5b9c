"""One train-step row and one 7B-meta compile row per adapter method beyond LoRA.

Each method is given as peft's config; adaptc compiles the same adapter from that config
(``adaptc.load_spec`` reads PEFT configs), so both sides adapt the same layers with the same
options. The train step is the harness's (``cases.train_step``: batch 2 × 128, AdamW);
the adapter weights are each library's own initialisation (the timing does not depend on
the values). OFT and BOFT adapt the attention projections only: the MLP's 1365-wide
intermediate size has no block size that divides it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import transformers as tf
from cases import (
    TARGETS,
    Settings,
    base_model,
    inputs,
    median_time,
    median_times,
    row,
    stepper,
)  # fmt: skip

import adaptc
from adaptc.methods import NAMES

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peft_configs() -> dict[str, Callable[[], Any]]:
    """peft's config per method (built lazily: the import of peft is slow)."""
    import peft

    task = {"task_type": "CAUSAL_LM"}
    return {
        "ia3": lambda: peft.IA3Config(
            target_modules=TARGETS, feedforward_modules=["down_proj"], **task
        ),
        "loha": lambda: peft.LoHaConfig(r=16, alpha=32, target_modules=TARGETS, **task),
        "lokr": lambda: peft.LoKrConfig(r=16, alpha=32, target_modules=TARGETS, **task),
        "vera": lambda: peft.VeraConfig(r=256, target_modules=TARGETS, **task),
        "oft": lambda: peft.OFTConfig(oft_block_size=32, r=0, target_modules=ATTENTION, **task),
        "boft": lambda: peft.BOFTConfig(
            boft_block_size=8, boft_n_butterfly_factor=1, target_modules=ATTENTION, **task
        ),
        "adalora": lambda: peft.AdaLoraConfig(
            init_r=16, target_r=8, total_step=1000, target_modules=TARGETS, **task
        ),
        "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=20, **task),
    }


def methods() -> list[str]:
    """The methods adaptc registers that have a row here."""
    return [name for name in peft_configs() if name in NAMES]


def _spec(config: Any) -> Any:
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return adaptc.load_spec(data)


def train_step(s: Settings, method: str) -> dict[str, Any]:
    import peft

    config = peft_configs()[method]()
    base = base_model(s)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = adaptc.compile(base, _spec(config))
    x = inputs(s, 128, batch=2)
    t = median_times({"ours": stepper(ours, x), "theirs": stepper(theirs, x)}, s)
    ratio = t["ours"] / t["theirs"]
    return row(f"train-step-{method}", "s", t["ours"], t["theirs"], None, ratio, "<=0.9")


def compile_meta(s: Settings, method: str) -> dict[str, Any]:
    import peft

    shape = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}  # fmt: skip
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**shape))
    config = peft_configs()[method]()
    spec = _spec(config)
    quick = Settings(repeat=max(1, s.repeat // 3), warmup=1)
    ours = median_time(lambda: adaptc.compile(model, spec), quick)
    copies = iter([copy.deepcopy(model) for _ in range(quick.warmup + quick.repeat)])
    theirs = median_time(
        lambda: peft.get_peft_model(next(copies), copy.deepcopy(config), low_cpu_mem_usage=True),
        quick,
    )
    return row(f"compile-meta-7b-{method}", "s", ours, theirs, None, ours / theirs, "<=0.5")


def cases(s: Settings) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    out: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for method in methods():
        out.append((f"train-step-{method}", lambda m=method: train_step(s, m)))
        out.append((f"compile-meta-7b-{method}", lambda m=method: compile_meta(s, m)))
    return out
