"""``adaptc convert-adapter ADAPTER --to lora``: any adapter as LoRA, by truncated SVD."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from adaptc.cli._common import add_command, fail, spec_source
from adaptc.cli.plan import CACHE_HELP
from adaptc.spec import SpecError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "convert-adapter",
        "Turn an adapter of any method (LoHa, LoKr, IA3, OFT, …) into a LoRA adapter that "
        "serving engines read (vLLM, TGI, LoRAX): each layer's ΔW by truncated SVD, with "
        "the relative error per layer printed. --rank fixes the rank; --max-error picks "
        "the smallest rank per layer within the error (capped by --rank when both are "
        "given).",
        """
        adaptc convert-adapter ./my-loha --to lora --rank 16 --out ./my-lora
        adaptc convert-adapter ./my-oft --to lora --max-error 0.01 --model ./base --out lora/
        """,
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adaptc, PEFT) or hub id")
    p.add_argument("--to", choices=("lora",), required=True, help="the target method")
    p.add_argument("--rank", type=int, metavar="R", help="LoRA rank of every layer")
    p.add_argument(
        "--max-error", type=float, metavar="E",
        help="the largest relative error ‖ΔW − B·A‖/‖ΔW‖ a layer may have; the rank is "
        "chosen per layer",
    )  # fmt: skip
    p.add_argument(
        "--model", metavar="MODEL",
        help="the base model directory or hub id (default: the adapter's "
        "base_model_name_or_path)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the LoRA adapter")
    p.add_argument("--adapter-name", metavar="NAME", help="which adapter of a multi-adapter dir")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.rank is None and args.max_error is None:
        return fail("convert-adapter", "give --rank R, --max-error E or both")
    out = Path(args.out)
    if out.exists() and not args.force:
        return fail("convert-adapter", f"{out} exists; pass --force to replace it")
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.adapters.to_lora import ToLoraError, to_lora
    from adaptc.compiler import CompileError
    from adaptc.io import AdapterLoadError, save_adapter
    from adaptc.io.load import load_adapter
    from adaptc.models import ModelError, build_model, resolve_model
    from adaptc.spec import load_spec

    try:
        source = spec_source(args.adapter, args.cache_dir)
        folder = Path(source) / args.adapter_name if args.adapter_name else Path(source)
        spec = load_spec(folder)
        name = next(iter(spec.adapters))
        model_ref = args.model or (spec.base_model.name if spec.base_model else None)
        if not model_ref:
            return fail(
                "convert-adapter",
                f"{args.adapter} names no base model (base_model_name_or_path): pass --model",
            )
        ref = resolve_model(model_ref, cache_dir=args.cache_dir)
        base = build_model(ref, task_type=spec.task_type, meta=False)
        model = load_adapter(base, folder, adapter_name=name, cache_dir=args.cache_dir)
        result = to_lora(model, base, rank=args.rank, max_error=args.max_error, adapter=name)
        save_adapter(result.model, out)
    except (SpecError, ModelError, AdapterLoadError, CompileError, ToLoraError) as exc:
        return fail("convert-adapter", str(exc).splitlines()[0])
    except ValueError as exc:  # a hub id that cannot be fetched, a bad adapter
        return fail("convert-adapter", str(exc).splitlines()[0])
    except OSError as exc:
        return fail("convert-adapter", f"cannot write {exc.filename or out}: {exc.strerror or exc}")
    if args.json:
        layers = [asdict(layer) for layer in result.layers]
        print(json.dumps({"out": str(out), "adapter": name, "layers": layers}))
    else:
        print(result.table())
        print(
            f"wrote {out}: LoRA adapter {name!r}, {len(result.layers)} layer(s), the largest "
            f"relative error {result.max_error:.3e}",
            file=sys.stderr,
        )
    return 0
