"""``adaptc compile SPEC [MODEL]``: load the model's weights, compile the spec, save the adapter."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace
from typing import Any

import adaptc
from adaptc.cli._common import DTYPE_NAMES, add_command, fail
from adaptc.cli.plan import CACHE_HELP, REVISION_HELP, spec_and_model


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "compile",
        "Compile SPEC onto MODEL (its real weights): print the adapted modules and PEFT's "
        "trainable-parameter line, and with --out write the initialised adapter in PEFT's "
        "format (adapter_model.safetensors, adapter_config.json, adaptc_spec.yaml).",
        """
        adaptc compile specs/examples/seed-opt-350m.yaml            # MODEL from base_model.name
        adaptc compile my-spec.yaml ./checkpoints/opt-350m --out adapter/
        adaptc compile my-spec.yaml meta-llama/Llama-2-7b-hf --dtype bf16 --json
        adaptc compile my-spec.yaml mypkg.models:build --quiet
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
    p.add_argument("--out", metavar="DIR", help="write the initialised adapter to DIR")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="load the weights in this dtype")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar, no table: PEFT's line only"
    )
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)
    p.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.compiler.compile import compiled_info
    from adaptc.counting import trainable_line
    from adaptc.models import DTYPES, build_model, dtype_name, model_dtype, resolve_model
    from adaptc.quantize import describe

    found = spec_and_model(args, "compile")
    if isinstance(found, int):
        return found
    spec, name, revision = found
    if args.out and spec.merge:
        return fail(
            "compile",
            f"{args.spec} has merge: true, so the compiled model keeps no adapter to write to "
            f"{args.out}; drop merge: true to save the adapter",
        )
    progress = not args.quiet and not args.json and sys.stderr.isatty()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", adaptc.AdaptcWarning)
        try:
            ref = resolve_model(name, cache_dir=args.cache_dir, revision=revision)
            dtype = DTYPES.get(args.dtype or "")
            quantization = spec.quantization
            model = build_model(
                ref, task_type=spec.task_type, meta=False, dtype=dtype, progress=progress,
                quantization=quantization,
            )  # fmt: skip
            new = adaptc.compile(model, spec)
            info = compiled_info(new)  # the plan compile followed (a merged model has none)
            plan = info.plan if info is not None else adaptc.build_plan(model, spec)
            if args.out:
                adaptc.save_adapter(new, args.out)
        except ValueError as exc:  # ModelError, CompileError, save errors: one line each
            return fail("compile", str(exc))
        except OSError as exc:
            return fail(
                "compile", f"cannot write {exc.filename or args.out}: {exc.strerror or exc}"
            )
    messages = _ours(caught)
    trainable, total = adaptc.trainable_parameters(new)
    line = trainable_line(trainable, total)
    if args.json:
        doc: dict[str, Any] = {
            "model": name,
            "model_class": type(model).__name__,
            "dtype": dtype_name(model_dtype(model)),
            "quantization": None if quantization is None else quantization.model_dump(),
            "plan": plan.to_dict(),
            "trainable_params": trainable,
            "all_params": total,
            "trainable_line": line,
            "warnings": messages,
            "out": args.out,
        }
        print(json.dumps(doc, indent=2))
        return 0
    if not args.quiet:
        merged = ", adapters merged into the weights" if spec.merge else ""
        quantized = f", {describe(quantization)}" if quantization is not None else ""
        print(
            f"{name}: {type(model).__name__} ({dtype_name(model_dtype(model))}{quantized}{merged})"
        )
        print(replace(plan, warnings=()))
    print(line)
    for message in messages:
        print(f"warning: {message}")
    if args.out and not args.quiet:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    """adaptc's warnings, once each; others go to stderr as they would have."""
    ours: dict[str, None] = {}
    for w in caught:
        if issubclass(w.category, adaptc.AdaptcWarning):
            ours[str(w.message)] = None
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return list(ours)
