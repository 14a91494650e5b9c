"""``adaptc plan SPEC MODEL``: what compiling would do, on the meta device (no weight is read)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import adaptc
from adaptc.cli._common import DTYPE_NAMES, add_command, fail, spec_source
from adaptc.spec import Spec, SpecError

if TYPE_CHECKING:
    import torch

    from adaptc.models import MemoryEstimate
    from adaptc.plan.plan import Plan

_GIB = 1024**3
CACHE_HELP = "Hugging Face cache to use (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)"
REVISION_HELP = "hub revision of MODEL (default: the spec's base_model.revision, else main)"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "plan",
        "Show what compiling SPEC onto MODEL would do: the adapted modules, their shapes and "
        "parameter counts, and the memory to train. The model is built on the meta device: "
        "no weight is read, so a 70B model plans in seconds.",
        """
        adaptc plan specs/examples/llama-all-linear.yaml meta-llama/Llama-2-7b-hf  # config only
        adaptc plan my-spec.yaml ./checkpoints/opt-350m          # a model directory
        adaptc plan my-spec.yaml llama-70b/config.json --dtype bf16
        adaptc plan my-spec.yaml mypkg.models:build --json       # a factory; JSON on stdout
        """,
    )
    p.add_argument(
        "spec", metavar="SPEC", help="spec file, adapter_config.json, adapter dir or hub id"
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="model directory, config.json, hub id, or package.module:factory "
        "(default: the spec's base_model.name)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="dtype of the base weights for the memory estimate (default: the checkpoint's)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)
    p.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.counting import trainable_line
    from adaptc.models import (
        DTYPES,
        build_model,
        dtype_name,
        model_dtype,
        resolve_model,
        training_memory,
    )
    from adaptc.quantize import describe, quantized_bytes  # lazily too (torch)

    found = spec_and_model(args, "plan")
    if isinstance(found, int):
        return found
    spec, name, revision = found
    try:
        ref = resolve_model(name, cache_dir=args.cache_dir, revision=revision)
        model = build_model(
            ref, task_type=spec.task_type, meta=True, dtype=DTYPES.get(args.dtype or "")
        )
        plan = adaptc.build_plan(model, spec)
    except ValueError as exc:  # ModelError, and the plan's one-line target errors
        return fail("plan", str(exc))
    dtype = model_dtype(model)
    quantization = spec.quantization
    quantized = None if quantization is None else quantized_bytes(model, quantization, dtype)
    described = None if quantization is None else describe(quantization)
    memory = training_memory(plan, dtype, quantized)
    line = trainable_line(plan.trainable_params, plan.total_params)
    if args.json:
        doc: dict[str, Any] = {
            "model": name,
            "model_class": type(model).__name__,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "plan": plan.to_dict(),
            "trainable_line": line,
            "memory": {
                "dtype": dtype_name(dtype),
                "quantization": described,
                **{k: m.to_dict() for k, m in memory.items()},
            },
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{name}: {type(model).__name__} (meta device, no weight read)")
    print(replace(plan, warnings=()))
    print(line)
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print(memory_table(memory, dtype, _methods_title(plan), described))
    return 0


def _methods_title(plan: Plan) -> str:
    """``LoRA``, ``IA3`` or ``LoRA + IA3``: the plan's methods, for the memory table."""
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.methods.registry import method

    names = dict.fromkeys(t.method for t in plan.targets) or {"lora": None}
    return " + ".join(method(n).title for n in names)


def spec_and_model(args: argparse.Namespace, command: str) -> tuple[Spec, str, str | None] | int:
    """The spec, MODEL and its revision; an exit code (errors printed) when one is missing."""
    try:
        spec = adaptc.load_spec(spec_source(args.spec, args.cache_dir))
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError as exc:  # a hub id that cannot be fetched
        return fail(command, str(exc))
    name, revision = model_of(spec, args.model, args.revision)
    if name is None:
        return fail(command, f"give MODEL: {args.spec} has no base_model.name")
    return spec, name, revision


def model_of(spec: Spec, model: str | None, revision: str | None) -> tuple[str | None, str | None]:
    """MODEL and its revision: as given, else the spec's ``base_model`` (None when neither)."""
    base = spec.base_model
    if base is not None and model in (None, base.name):
        return base.name, revision or base.revision
    return model, revision


def memory_table(
    memory: dict[str, MemoryEstimate],
    dtype: torch.dtype,
    adapters: str = "LoRA",
    quantization: str | None = None,
) -> str:
    """The memory to train as a table; a ``qlora`` estimate is the first row, named after
    the ``quantization`` (``LoRA, base bitsandbytes 4-bit nf4``)."""
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.models import dtype_name

    rows: list[tuple[str, ...]] = [("memory to train", "weights", "gradients", "AdamW", "total")]
    labels = [(adapters, "lora"), ("full fine-tuning", "full")]
    if "qlora" in memory:
        labels.insert(0, (f"{adapters}, base {quantization}", "qlora"))
        labels[1] = (f"{adapters}, base {dtype_name(dtype)}", "lora")
    for label, key in labels:
        m = memory[key]
        rows.append(
            (
                label,
                *(f"{n / _GIB:,.2f} GiB" for n in (m.weights, m.gradients, m.optimizer, m.total)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    quantized = (
        "; quantized: linear layers but the head, with their scales" if "qlora" in memory else ""
    )
    note = (
        f"base weights {dtype_name(dtype)}{quantized}, adapter weights fp32, AdamW states fp32; "
        "activations not included"
    )
    return "\n".join([*lines, f"({note})"])
