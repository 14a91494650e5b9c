"""`adaptc plan` on a 70B-shaped Llama config.json: wall time and peak memory.

Usage: python benchmarks/plan_70b.py [--repeat 3]
Writes the config to a temporary directory, runs the installed CLI (`python -m adaptc plan
SPEC config.json --json`) in a fresh process, and prints one JSON line: the median wall time
of the whole command (interpreter start and imports included), the median time spent after
the imports (resolve, meta build, plan, print), and the peak resident memory of the child.
The target: <= 5 s and < 1 GB. The model is built on the meta device, so no weight exists.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "dtype": "bfloat16",
}
SPEC = {
    "version": 1,
    "task_type": "CAUSAL_LM",
    "adapters": {"default": {"r": 16, "lora_alpha": 32, "targets": {"kind": "all-linear"}}},
}
# Imports first, then the command: the child reports how long the command itself took.
CHILD = """
import sys, time, io, contextlib
import adaptc.cli
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = adaptc.cli.main(sys.argv[1:])
print(code, time.perf_counter() - start, len(out.getvalue()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(CONFIG))
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(SPEC))
        argv = ["plan", str(spec), str(config), "--json"]
        walls, commands = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True
            )
            walls.append(time.perf_counter() - start)
            code, seconds, _ = proc.stdout.split()
            assert code == "0", proc.stderr
            commands.append(float(seconds))
        plan = json.loads(
            subprocess.run(
                [sys.executable, "-m", "adaptc", *argv], capture_output=True, text=True, check=True
            ).stdout
        )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    row = {
        "name": "plan-70b",
        "wall_s": round(statistics.median(walls), 3),
        "after_imports_s": round(statistics.median(commands), 3),
        "peak_rss_mb": round(peak / 2**20, 1),
        "targets": len(plan["plan"]["targets"]),
        "total_params": plan["plan"]["total_params"],
        "trainable_params": plan["plan"]["trainable_params"],
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
