"""``adaptc merge MODEL ADAPTER --out DIR``: a merged checkpoint, streamed shard by shard."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from adaptc.cli._common import DTYPE_NAMES, add_command, fail
from adaptc.cli.plan import CACHE_HELP
from adaptc.spec import Spec, SpecError

if TYPE_CHECKING:
    from torch import nn


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "merge",
        "Merge an adapter into a checkpoint: W + s·ΔW for every adapted layer, and the "
        "tensors the adapter trained (modules_to_save, biases), written as a normal Hugging "
        "Face checkpoint sharded like the input (config and tokenizer files copied). Streams "
        "one tensor at a time; the output appears whole or not at all.",
        """
        adaptc merge ./llama-3-8b ./my-adapter --out ./llama-3-8b-merged
        adaptc merge org/model org/model-lora --out merged/ --force     # hub ids
        adaptc merge ./base ./multi --adapter translate --out merged/
        """,
    )
    p.add_argument("model", metavar="MODEL", help="model directory (safetensors) or hub id")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adaptc, PEFT) or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument(
        "--adapter-name",
        "--adapter",
        dest="adapter_name",
        metavar="NAME",
        help="which adapter of a multi-adapter directory (peft's DIR/NAME/; default: the "
        "top-level one)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="write the floating-point tensors in this dtype (default: the spec's "
        "base_model.quantization.merge_dtype, else the checkpoint's)",
    )
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)
    p.add_argument("--revision", metavar="REV", help="hub revision of MODEL (default: main)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.io.load import AdapterLoadError
    from adaptc.io.merge_checkpoint import merge_checkpoint, merge_in_memory, shard_names
    from adaptc.models import (
        DTYPES,
        ModelError,
        build_model,
        checkpoint_dir,
        model_class,
        resolve_model,
    )
    from adaptc.plan.defaults import TASK_MODULES_TO_SAVE  # lazily too (torch)

    out = Path(args.out)
    if out.exists() and not args.force:
        return fail("merge", f"{out} exists; pass --force to replace it")
    bar = None
    errors: dict[str, float] = {}  # a requantizing merge's largest error, per layer
    try:
        ref = resolve_model(args.model, cache_dir=args.cache_dir, revision=args.revision)
        source = checkpoint_dir(ref)  # a directory or a hub id; a factory or config is refused

        def meta_model(spec: Spec) -> nn.Module:  # the checkpoint's own class decides
            task = spec.task_type
            # the adapter trained a head (a classifier) the checkpoint does not have
            new_head = task in TASK_MODULES_TO_SAVE and model_class(ref, task) is not (
                model_class(ref, None)
            )
            requantize = spec.quantization is not None and spec.quantization.merge == "requantize"
            # targeted parameters (fused experts) are not the checkpoint's tensors, which
            # transformers converts on loading and saving: merged in memory
            fused = any(getattr(a, "target_parameters", None) for a in spec.adapters.values())
            if new_head or requantize or fused:  # requantized: from the quantized model
                raise _InMemory(spec, new_head=new_head, requantize=requantize)
            return build_model(ref, task_type=None, meta=True)

        total = sum((source / name).stat().st_size for name in shard_names(source))
        bar = _progress(total, quiet=args.quiet or args.json)
        try:
            report = merge_checkpoint(
                source, args.adapter, out, build_meta_model=meta_model,
                adapter=args.adapter_name, force=args.force,
                progress=bar.update if bar is not None else None,
                dtype=DTYPES.get(args.dtype or ""),
            )  # fmt: skip
        except _InMemory as in_memory:  # a new head, or a requantizing merge
            spec = in_memory.spec
            task = spec.task_type if in_memory.new_head else None
            quantization = spec.quantization if in_memory.requantize else None
            if quantization is not None and quantization.method != "bitsandbytes":
                return fail(
                    "merge",
                    f"a requantized {quantization.method} checkpoint cannot be written yet "
                    "(bitsandbytes only); set merge: dequantize for a float checkpoint",
                )

            def full_model(labels: int | None) -> nn.Module:
                overrides = {} if labels is None else {"num_labels": labels}
                return build_model(
                    ref, task_type=task, meta=False, config_overrides=overrides,
                    quantization=quantization,
                )  # fmt: skip

            report = merge_in_memory(
                full_model, source, args.adapter, out, adapter=args.adapter_name,
                force=args.force, errors=errors,
            )  # fmt: skip
    except (ModelError, AdapterLoadError, SpecError, FileExistsError) as exc:
        return fail("merge", str(exc).splitlines()[0])
    except ValueError as exc:  # a non-finite merged weight (names adapter and module), ...
        return fail("merge", str(exc).splitlines()[0])
    except OSError as exc:
        return fail("merge", f"cannot write {exc.filename or out}: {exc.strerror or exc}")
    finally:
        if bar is not None:
            bar.close()
    summary = {"out": str(report.out_dir), "adapter": report.adapter, "shards": report.shards,
               "tensors": report.tensors, "merged": report.merged,
               "replaced": report.replaced, "dequantized": report.dequantized,
               "requantized": errors}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        copied = f", {report.replaced} taken from the adapter" if report.replaced else ""
        if report.dequantized:
            copied += f", {report.dequantized} dequantized"
        if errors:
            worst = max(errors, key=errors.__getitem__)
            copied += f" (requantized: the largest error {errors[worst]:.3g}, {worst})"
        print(f"wrote {report.out_dir}: adapter {report.adapter!r}, {report.merged} merged"
              f"{copied}, of {report.tensors} tensors in {report.shards} shard(s)")  # fmt: skip
    return 0


class _InMemory(Exception):
    """The adapter is merged in memory: its task needs another model class than the
    checkpoint's, its spec asks for a requantized (quantized) checkpoint, or it targets
    parameters (a mixture of experts' fused stacks, which checkpoints keep per expert)."""

    def __init__(self, spec: Spec, *, new_head: bool, requantize: bool) -> None:
        super().__init__(spec.task_type)
        self.spec, self.new_head, self.requantize = spec, new_head, requantize


def _progress(total: int, *, quiet: bool):  # type: ignore[no-untyped-def]
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr)
