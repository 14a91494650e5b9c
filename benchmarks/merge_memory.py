"""Peak memory of a streamed checkpoint merge, against the largest shard.

Usage: python benchmarks/merge_memory.py [--hidden 512] [--layers 8] [--shard 60MB]
       [--quantization '{"method": "bitsandbytes", "bits": 4, "quant_type": "nf4"}']
Builds a Llama-shaped checkpoint in a temp dir (separate process), saves an adapter, then
merges in a fresh process and prints one JSON line: peak RSS growth during the merge, the
largest shard, the adapter size, and the ratio growth / (largest shard + adapter). With
``--quantization`` the adapter's spec declares a quantized base, so the merge writes the
dequantized weights (each quantized and dequantized as it streams by) plus the update.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SETUP = textwrap.dedent(
    """
    import json, sys, torch, transformers as tf, adaptc
    out, hidden, layers, shard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    quantization = json.loads(sys.argv[5])
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=8, vocab_size=32000)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(out + "/base", max_shard_size=shard)
    spec = {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": {
        "r": 16, "targets": {"kind": "all-linear"}, "init": "gaussian"}}}
    if quantization:
        spec["base_model"] = {"name": out + "/base", "quantization": quantization}
    adaptc.save_adapter(adaptc.compile(model, spec), out + "/adapter")
    """
)
MERGE = textwrap.dedent(
    """
    import json, resource, sys, torch, transformers as tf
    from pathlib import Path
    from adaptc.io.merge_checkpoint import merge_checkpoint

    def build(path, spec):
        with torch.device("meta"):
            return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(path))

    out = Path(sys.argv[1])
    build(out / "base", None)  # warm up imports and lazy modules
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    merge_checkpoint(out / "base", out / "adapter", out / "merged",
                 build_meta_model=lambda spec: build(out / "base", spec))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shards = [p.stat().st_size for p in (out / "base").glob("*.safetensors")]
    adapter = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    ratio = round((peak - before) / (max(shards) + adapter), 3)
    print(json.dumps({"growth": peak - before, "largest_shard": max(shards),
                      "shards": len(shards), "adapter": adapter, "ratio": ratio}))
    """
)


def measure(hidden: int, layers: int, shard: str, quantization: str = "null") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-c", SETUP, tmp, str(hidden), str(layers), shard, quantization],
            check=True,
        )
        proc = subprocess.run(
            [sys.executable, "-c", MERGE, tmp], check=True, capture_output=True, text=True
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard", default="60MB")
    parser.add_argument("--quantization", default="null", help="base_model.quantization (JSON)")
    args = parser.parse_args()
    row = measure(args.hidden, args.layers, args.shard, args.quantization)
    name = "merge-peak-memory" + ("-dequantized" if json.loads(args.quantization) else "")
    print(json.dumps({"name": name, "unit": "x(largest shard + adapter)", **row}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
