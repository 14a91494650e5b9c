"""Compiling shares the base weights: resident memory grows by the adapter, not the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, json, torch, transformers as tf
    import adaptc

    def rss():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, vocab_size=32000, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    spec = {"version": 1, "adapters": {"default": {"r": 8, "targets": {"kind": "all-linear"}}}}
    adaptc.compile(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"version": 1, "adapters": {
        "d": {"targets": {"kind": "names", "names": ["0"]}}}})  # warm up imports and caches
    gc.collect()
    before = rss()
    new = adaptc.compile(model, spec)
    gc.collect()
    after = rss()
    adapter = sum(p.numel() * p.element_size() for p in new.parameters() if p.requires_grad)
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"before": before, "after": after, "adapter": adapter, "base": base,
                      "params": sum(p.numel() for p in model.parameters())}))
    """
)


def test_compile_adds_only_the_adapter_to_resident_memory():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["params"] >= 100_000_000
    growth = m["after"] - m["before"]
    constant = 48 * 1024 * 1024  # graphs, modules, Python objects
    assert growth <= m["adapter"] + constant, (
        f"compile grew RSS by {growth / 2**20:.1f} MiB; adapter is {m['adapter'] / 2**20:.1f} "
        f"MiB, base {m['base'] / 2**20:.0f} MiB"
    )
