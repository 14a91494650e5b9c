"""QLoRA rows of ``make bench``: adaptc and peft on the same bitsandbytes 4-bit Llama.

- ``qlora-train-step``: one AdamW step (forward, backward, update), adaptc / peft;
- ``qlora-train-step-peak-memory``: the step's peak memory above the loaded model, measured
  in a fresh process per library (as ``train-step-peak-memory``), adaptc / peft;
- ``qlora-weights-vs-lora``: the bytes the compiled model holds (base weights with their
  quantization state, adapter) on the 4-bit base, against the same adapter on the float
  base (``base`` is the float LoRA model's bytes).

The base is the harness's Llama (``Settings.llama``) saved once and loaded with
``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, compute dtype = the run's)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers as tf

import adaptc

HERE = Path(__file__).resolve().parent
_CHECKPOINTS: dict[tuple[int, int], Path] = {}


def checkpoint(s: Any) -> Path:
    """The harness's Llama (random weights, fixed seed) saved once per size."""
    key = (s.hidden, s.layers)
    if key not in _CHECKPOINTS:
        path = Path(tempfile.mkdtemp(prefix="adaptc-qlora-"))
        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(**s.llama)).save_pretrained(path)
        _CHECKPOINTS[key] = path
    return _CHECKPOINTS[key]


def load_4bit(path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map={"": device}, dtype=dtype
        ).eval()


def qlora_pair(path: Path, dtype: torch.dtype, device: str) -> tuple[Any, torch.nn.Module]:
    """(peft model, adaptc model), each on its own load of the 4-bit base, same adapter."""
    import peft
    from cases import peft_config

    torch.manual_seed(1)
    theirs = peft.get_peft_model(load_4bit(path, dtype, device), peft_config())
    with torch.no_grad():  # non-zero B, so the adapters do work
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.01)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = adaptc.load_adapter(load_4bit(path, dtype, device), tmp, trainable=True)
    return theirs, ours


def train_step(s: Any) -> dict[str, Any]:
    from cases import inputs, median_times, row

    theirs, ours = qlora_pair(checkpoint(s), s.dtype, s.device)
    x = inputs(s, 128, batch=2)

    def stepper(model: torch.nn.Module):  # type: ignore[no-untyped-def]
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            model(**x, labels=x["input_ids"]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    t = median_times({"ours": stepper(ours), "theirs": stepper(theirs)}, s)
    ratio = t["ours"] / t["theirs"]
    return row("qlora-train-step", "s", t["ours"], t["theirs"], None, ratio, "<=0.9")


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    from cases import Settings, inputs
    from qlora import qlora_pair
    torch.set_num_threads(2)
    device, dtype = sys.argv[5], getattr(torch, sys.argv[6])
    s = Settings(hidden=int(sys.argv[3]), layers=int(sys.argv[4]), device=device, dtype=dtype)
    theirs, ours = qlora_pair(sys.argv[7], dtype, device)
    model = ours if sys.argv[1] == "adaptc" else theirs
    del theirs, ours
    model.train()
    x = inputs(s, 128, batch=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    import gc; gc.collect()
    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = status("VmRSS:")
    for _ in range(2):
        model(**x, labels=x["input_ids"]).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
    else:
        peak = status("VmHWM:")
    print(json.dumps({"peak": peak - before}))
    """
)


def train_memory(s: Any) -> dict[str, Any]:
    from cases import row

    path = checkpoint(s)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    peaks: dict[str, float] = {}
    for who in ("adaptc", "peft"):
        for _ in range(2):  # the least of two runs
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY_SCRIPT, who, str(HERE), str(s.hidden),
                 str(s.layers), s.device, str(s.dtype).removeprefix("torch."), str(path)],
                capture_output=True, text=True, timeout=900, env=env,
            )  # fmt: skip
            if proc.returncode:
                raise RuntimeError(f"QLoRA memory run for {who} failed:\n{proc.stderr[-3000:]}")
            peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
            peaks[who] = min(peaks.get(who, peak), peak)
    ratio = peaks["adaptc"] / peaks["peft"] if peaks["peft"] else None
    return row(
        "qlora-train-step-peak-memory", "bytes", peaks["adaptc"], peaks["peft"], None, ratio,
        "<=0.9",
    )  # fmt: skip


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages a model holds: parameters, buffers, and a 4-bit
    weight's quantization state (block scales, their own scales, code tables)."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def weights_vs_lora(s: Any) -> dict[str, Any]:
    from cases import row, spec

    path = checkpoint(s)
    quantized = adaptc.compile(load_4bit(path, s.dtype, s.device), spec())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_base = tf.AutoModelForCausalLM.from_pretrained(path, dtype=s.dtype).to(s.device)
    lora = adaptc.compile(float_base, spec())
    ours, base = held_bytes(quantized), held_bytes(lora)
    return row("qlora-weights-vs-lora", "bytes", ours, None, base, ours / base, "<=0.5")
