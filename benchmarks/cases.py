"""The benchmark cases: adaptc and peft on the same model, inputs, dtype and threads.

Each case returns one row: ``{name, unit, adaptc, peft, base, ratio, target, met}``.
``ratio`` is adaptc / peft (for overheads: adaptc's overhead / peft's overhead); ``met``
says whether the ratio meets ``target`` (``<= target``, or within ±0.02 of 1.00 for the
merged-inference row).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf

import adaptc
from adaptc.methods.lora.branch import LoraBranch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Settings:
    repeat: int = 10
    warmup: int = 2
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int = 2
    hidden: int = 512
    layers: int = 6
    train_batch: int = 2  # the training rows' batch: train_batch sequences of train_seq
    train_seq: int = 128

    @property
    def llama(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden,
            "intermediate_size": self.hidden * 8 // 3,
            "num_hidden_layers": self.layers,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "vocab_size": 8000,
        }


def median_time(fn: Callable[[], Any], s: Settings) -> float:
    for _ in range(s.warmup):
        fn()
    times = []
    for _ in range(s.repeat):
        _sync(s)
        start = time.perf_counter()
        fn()
        _sync(s)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_times(fns: dict[str, Callable[[], Any]], s: Settings) -> dict[str, float]:
    """Medians of interleaved runs (each round runs every function once), so drift in the
    machine's speed hits all of them alike."""
    for fn in fns.values():
        for _ in range(s.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(s.repeat):
        for key, fn in fns.items():
            _sync(s)
            start = time.perf_counter()
            fn()
            _sync(s)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _sync(s: Settings) -> None:
    if s.device == "cuda":
        torch.cuda.synchronize()


def row(
    name: str, unit: str, ours: float, theirs: float | None, base: float | None,
    ratio: float | None, target: str,
) -> dict[str, Any]:  # fmt: skip
    met = None
    if ratio is not None:
        if target.startswith("1.00"):
            met = abs(ratio - 1.0) <= 0.02
        else:
            met = ratio <= float(target.removeprefix("<="))
    return {
        "name": name, "unit": unit, "adaptc": _round(ours), "peft": _round(theirs),
        "base": _round(base), "ratio": _round(ratio), "target": target, "met": met,
    }  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def spec(dropout: float = 0.0, r: int = 16) -> dict[str, Any]:
    return {
        "version": 1,
        "task_type": "CAUSAL_LM",
        "adapters": {"default": {"r": r, "lora_alpha": 2 * r, "lora_dropout": dropout,
                                 "targets": {"kind": "names", "names": TARGETS}}},
    }  # fmt: skip


def peft_config(dropout: float = 0.0, r: int = 16) -> Any:
    import peft

    return peft.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )  # fmt: skip


def base_model(s: Settings) -> torch.nn.Module:
    torch.manual_seed(0)
    if s.device == "cpu":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**s.llama))
    else:  # initialise on the accelerator: a 1B model's init on 2 CPU threads takes long
        try:
            with torch.device(s.device):
                model = tf.LlamaForCausalLM(tf.LlamaConfig(**s.llama))
        except Exception as exc:
            print(f"building on {s.device} failed ({exc!r}); building on the CPU", file=sys.stderr)
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**s.llama))
    return model.to(device=s.device, dtype=s.dtype).eval()


def pair(s: Settings, dropout: float = 0.0) -> tuple[torch.nn.Module, Any, torch.nn.Module]:
    """(base, peft model, adaptc model) with the same non-zero adapter weights."""
    import peft

    base = base_model(s)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(dropout))
    ours = adaptc.compile(base, spec(dropout))
    with torch.no_grad():
        layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip
        for branch in [m for m in ours.modules() if isinstance(m, LoraBranch)]:
            layer = layers[branch.target]
            b = torch.randn_like(layer.lora_B["default"].weight) * 0.01
            layer.lora_B["default"].weight.copy_(b)
            branch.lora_B.weight.copy_(b)
            branch.lora_A.weight.copy_(layer.lora_A["default"].weight)
    return base, theirs, ours


def inputs(s: Settings, seq: int, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (batch, seq), generator=gen).to(s.device)
    return {"input_ids": ids}


def train_inputs(s: Settings) -> dict[str, torch.Tensor]:
    """The training rows' batch (``s.train_batch`` × ``s.train_seq`` tokens)."""
    return inputs(s, s.train_seq, batch=s.train_batch)


def stepper(model: Any, x: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One AdamW training step of ``model`` on ``x`` (forward with labels, backward,
    update, gradients cleared); ``model`` is put in training mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# --- the cases -------------------------------------------------------------------------


def compile_meta(s: Settings, shape: str) -> dict[str, Any]:
    import peft

    shapes = {
        "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
        "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
    }  # fmt: skip
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**shapes[shape]))
    adapter = {"r": 16, "lora_alpha": 32, "targets": {"kind": "all-linear"}}
    data = {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": adapter}}
    config = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    quick = Settings(repeat=max(1, s.repeat // 3), warmup=1)
    ours = median_time(lambda: adaptc.compile(model, data), quick)
    theirs = _peft_time(lambda m: peft.get_peft_model(m, config), model, quick)
    return row(f"compile-meta-{shape}", "s", ours, theirs, None, ours / theirs, "<=0.5")


def _peft_time(fn: Callable[[Any], Any], model: torch.nn.Module, s: Settings) -> float:
    """peft rewrites the model in place: time it on copies made beforehand."""
    copies = iter([copy.deepcopy(model) for _ in range(s.warmup + s.repeat)])
    return median_time(lambda: fn(next(copies)), s)


def compile_real(s: Settings) -> dict[str, Any]:
    import peft

    big = Settings(hidden=768, layers=12)  # ~100M parameters with its 8000-word vocabulary
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**big.llama, "vocab_size": 32000}))
    quick = Settings(repeat=max(2, s.repeat // 3), warmup=1)
    ours = median_time(lambda: adaptc.compile(model, spec()), quick)
    theirs = _peft_time(lambda m: peft.get_peft_model(m, peft_config()), model, quick)
    return row("compile-real-100m", "s", ours, theirs, None, ours / theirs, "<=1.0")


def inference_overhead(s: Settings, seq: int) -> dict[str, Any]:
    base, theirs, ours = pair(s)
    x = inputs(s, seq)
    with torch.no_grad():
        t = median_times({"base": lambda: base(**x), "ours": lambda: ours(**x),
                          "theirs": lambda: theirs(**x)}, s)  # fmt: skip
    t_base, t_ours, t_theirs = t["base"], t["ours"], t["theirs"]
    o_ours, o_theirs = t_ours / t_base - 1, t_theirs / t_base - 1
    ratio = o_ours / o_theirs if o_theirs > 0 else None
    return row(f"inference-overhead-seq{seq}", "t/t_base-1", o_ours, o_theirs, 0.0, ratio, "<=0.5")


def merged_inference(s: Settings) -> dict[str, Any]:
    base, _, ours = pair(s)
    merged = adaptc.merge(ours).eval()
    x = inputs(s, 128)
    with torch.no_grad():
        t = median_times({"base": lambda: base(**x), "merged": lambda: merged(**x)}, s)
    t_base, t_merged = t["base"], t["merged"]
    return row(
        "merged-inference-seq128", "s", t_merged, None, t_base, t_merged / t_base, "1.00±0.02"
    )


def train_step(s: Settings, dropout: float) -> dict[str, Any]:
    _, theirs, ours = pair(s, dropout)
    x = train_inputs(s)
    t = median_times({"ours": stepper(ours, x), "theirs": stepper(theirs, x)}, s)
    t_ours, t_theirs = t["ours"], t["theirs"]
    name, target = f"train-step-dropout{dropout:g}", "<=0.9" if dropout == 0 else "<=0.85"
    return row(name, "s", t_ours, t_theirs, None, t_ours / t_theirs, target)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    sys.path.insert(0, sys.argv[2])
    from cases import Settings, pair, train_inputs
    torch.set_num_threads(2)
    # argv: who, here, hidden, layers, device, dtype, dropout, train batch, train seq[, 4-bit]
    device, dtype, dropout = sys.argv[5], getattr(torch, sys.argv[6]), float(sys.argv[7])
    s = Settings(hidden=int(sys.argv[3]), layers=int(sys.argv[4]), device=device, dtype=dtype,
                 train_batch=int(sys.argv[8]), train_seq=int(sys.argv[9]))
    if len(sys.argv) > 10:  # a checkpoint to load 4-bit (benchmarks/qlora.py)
        from qlora import qlora_pair
        theirs, ours = qlora_pair(sys.argv[10], dtype, device)
    else:
        _, theirs, ours = pair(s, dropout)
    model = ours if sys.argv[1] == "adaptc" else theirs  # both stay alive, in both runs
    model.train()
    x = train_inputs(s)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    import gc; gc.collect()
    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))
    if device == "cuda":  # the allocator's peak, from what is allocated now
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak (VmHWM) to the current size
        before = status("VmRSS:")
    for _ in range(2):
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = status("VmHWM:")
    print(json.dumps({"peak": peak - before}))
    """
)


def memory_args(s: Settings, dropout: float = 0.0) -> list[str]:
    """``_MEMORY_SCRIPT``'s arguments after ``who`` (a 4-bit checkpoint may follow)."""
    here = str(Path(__file__).resolve().parent)
    return [here, str(s.hidden), str(s.layers), s.device, str(s.dtype).removeprefix("torch."),
            str(dropout), str(s.train_batch), str(s.train_seq)]  # fmt: skip


def train_memory(s: Settings, dropout: float) -> dict[str, Any]:
    peaks = peak_memory(_MEMORY_SCRIPT, memory_args(s, dropout))
    ratio = peaks["adaptc"] / peaks["peft"] if peaks["peft"] else None
    name = "train-step-peak-memory" + ("" if dropout == 0 else f"-dropout{dropout:g}")
    target = "<=0.9" if dropout == 0 else "<=0.8"
    return row(name, "bytes", peaks["adaptc"], peaks["peft"], None, ratio, target)


def peak_memory(script: str, args: list[str]) -> dict[str, float]:
    """``{"adaptc": bytes, "peft": bytes}``: the least of two runs of ``script`` per library
    (``python -c script WHO *args``; it prints ``{"peak": bytes}`` last), each in a fresh
    process. On the CPU, tensors of 64 KiB and more get their own mappings (freed at once),
    so the resident high-water mark follows live tensors, not malloc's caches; the least of
    two runs drops what the rest of the process adds by chance."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    peaks: dict[str, float] = {}
    for who in ("adaptc", "peft"):
        for _ in range(2):
            proc = subprocess.run(
                [sys.executable, "-c", script, who, *args],
                capture_output=True, text=True, timeout=900, env=env,
            )  # fmt: skip
            if proc.returncode:
                raise RuntimeError(f"memory run for {who} failed:\n{proc.stderr[-3000:]}")
            peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
            peaks[who] = min(peaks.get(who, peak), peak)
    return peaks


def compiled_inference(s: Settings) -> dict[str, Any]:
    _, theirs, ours = pair(s)
    x = inputs(s, 128)
    torch._dynamo.reset()
    c_ours = torch.compile(ours)
    c_theirs = torch.compile(theirs)
    with torch.no_grad():
        t = median_times({"ours": lambda: c_ours(**x), "theirs": lambda: c_theirs(**x)}, s)
    t_ours, t_theirs = t["ours"], t["theirs"]
    return row(
        "torch-compile-inference-seq128", "s", t_ours, t_theirs, None, t_ours / t_theirs, "<=0.95"
    )


def merge_time(s: Settings) -> dict[str, Any]:
    _, theirs, ours = pair(s)
    # peft's merge_and_unload defaults to safe_merge=False: compare like with like
    t_ours = median_time(lambda: adaptc.merge(ours, safe=False), s)
    t_theirs = _peft_time(lambda m: m.merge_and_unload(), theirs, s)
    gc.collect()
    return row("merge", "s", t_ours, t_theirs, None, t_ours / t_theirs, "<=1.0")


_MIXED: dict[tuple[Any, ...], Any] = {}


def mixed_batch(s: Settings, seq: int) -> list[dict[str, Any]]:
    """Two rows: a batch over 8 adapters vs PEFT's ``adapter_names`` (≥ 2× faster), and vs
    the same batch on one adapter (≤ 1.3×). The models are built once for both lengths."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mixed_batch as mb

    key = (s.device, s.dtype, s.hidden, s.layers)
    if key not in _MIXED:
        _MIXED.clear()
        _MIXED[key] = mb.build(s.device, s.dtype, s.hidden, s.layers)
    ours, theirs, names = _MIXED[key]
    r = mb.measure(ours, theirs, names, seq, s.repeat, s.warmup, s.device)
    if seq == 1:
        _MIXED.clear()
    mixed, single, peft_mixed = r["adaptc_mixed_s"], r["adaptc_single_s"], r["peft_mixed_s"]
    return [
        row(f"mixed-batch-seq{seq}", "s", mixed, peft_mixed, None, mixed / peft_mixed, "<=0.5"),
        row(f"mixed-vs-single-seq{seq}", "s", mixed, None, single, mixed / single, "<=1.3"),
    ]


Case = Callable[[], "dict[str, Any] | list[dict[str, Any]]"]


def all_cases(s: Settings) -> list[tuple[str, Case]]:
    """(name, case) pairs, so a caller can choose cases without running the others; a case
    gives one row, or several (the mixed-batch cases give two)."""
    import methods  # one row pair per method beyond LoRA (benchmarks/methods.py)
    import qlora  # the QLoRA rows (benchmarks/qlora.py; it imports this module)
    import training  # compiled train step, saved-for-backward (benchmarks/training.py)

    cases: list[tuple[str, Case]] = [
        ("compile-meta-7b", lambda: compile_meta(s, "7b")),
        ("compile-meta-70b", lambda: compile_meta(s, "70b")),
        ("compile-real-100m", lambda: compile_real(s)),
        ("inference-overhead-seq1", lambda: inference_overhead(s, 1)),
        ("inference-overhead-seq128", lambda: inference_overhead(s, 128)),
        ("merged-inference-seq128", lambda: merged_inference(s)),
        ("train-step-dropout0", lambda: train_step(s, 0.0)),
        ("train-step-dropout0.1", lambda: train_step(s, 0.1)),
        ("train-step-peak-memory", lambda: train_memory(s, 0.0)),
        ("train-step-peak-memory-dropout0.1", lambda: train_memory(s, 0.1)),
        ("saved-for-backward-dropout0", lambda: training.saved_for_backward(s, 0.0)),
        ("saved-for-backward-dropout0.1", lambda: training.saved_for_backward(s, 0.1)),
        ("torch-compile-inference-seq128", lambda: compiled_inference(s)),
        ("torch-compile-train-step", lambda: training.compiled_train_step(s)),
        ("merge", lambda: merge_time(s)),
        ("mixed-batch-seq128", lambda: mixed_batch(s, 128)),
        ("mixed-batch-seq1", lambda: mixed_batch(s, 1)),
        ("qlora-train-step", lambda: qlora.train_step(s)),
        ("qlora-train-step-peak-memory", lambda: qlora.train_memory(s)),
        ("qlora-weights-vs-lora", lambda: qlora.weights_vs_lora(s)),
    ]
    cases += methods.cases(s)
    if s.device != "cpu":  # torch.compile's cold start is the slowest row there: run it last
        cases.sort(key=lambda c: c[0].startswith("torch-compile"))
    return cases
