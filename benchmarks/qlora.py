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

import tempfile
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
    from cases import median_times, row, stepper, train_inputs

    theirs, ours = qlora_pair(checkpoint(s), s.dtype, s.device)
    x = train_inputs(s)
    t = median_times({"ours": stepper(ours, x), "theirs": stepper(theirs, x)}, s)
    ratio = t["ours"] / t["theirs"]
    return row("qlora-train-step", "s", t["ours"], t["theirs"], None, ratio, "<=0.9")


def train_memory(s: Any) -> dict[str, Any]:
    from cases import _MEMORY_SCRIPT, memory_args, peak_memory, row

    peaks = peak_memory(_MEMORY_SCRIPT, [*memory_args(s), str(checkpoint(s))])
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
