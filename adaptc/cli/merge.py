"""``adaptc merge MODEL ADAPTER --out DIR``: a merged checkpoint, streamed shard by shard."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptc.cli._common import add_command, fail
from adaptc.spec import Spec, SpecError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "merge",
        "Merge an adapter into a checkpoint: W + s·ΔW for every adapted layer, written as a "
        "normal Hugging Face checkpoint sharded like the input (config and tokenizer files "
        "copied). Streams one tensor at a time; the output appears whole or not at all.",
        """
        adaptc merge ./llama-3-8b ./my-adapter --out ./llama-3-8b-merged
        adaptc merge org/model ./adapter --out merged/ --force     # a hub id from the cache
        adaptc merge ./base ./multi --adapter translate --out merged/
        """,
    )
    p.add_argument("model", metavar="MODEL", help="model directory (safetensors) or cached hub id")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adaptc or PEFT)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument(
        "--adapter-name",
        "--adapter",
        dest="adapter_name",
        metavar="NAME",
        help="which adapter of a multi-adapter directory (default: the first)",
    )
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from adaptc.io.load import AdapterLoadError
    from adaptc.io.merge_checkpoint import merge_checkpoint
    from adaptc.models import ModelError, build_model, resolve_model

    out = Path(args.out)
    if out.exists() and not args.force:
        return fail("merge", f"{out} exists; pass --force to replace it")
    try:
        ref = resolve_model(args.model)
        if ref.path is None or ref.kind not in ("dir", "hub"):
            return fail("merge", f"{args.model}: merge needs a checkpoint directory (safetensors)")

        def meta_model(path: Path, spec: Spec):  # type: ignore[no-untyped-def]
            return build_model(ref, task_type=spec.task_type, meta=True)

        total = sum(p.stat().st_size for p in ref.path.glob("*.safetensors"))
        bar = _progress(total, quiet=args.quiet or args.json)
        report = merge_checkpoint(
            ref.path, args.adapter, out, build_meta_model=meta_model,
            adapter=args.adapter_name, force=args.force,
            progress=bar.update if bar is not None else None,
        )  # fmt: skip
        if bar is not None:
            bar.close()
    except (ModelError, AdapterLoadError, SpecError, FileExistsError) as exc:
        return fail("merge", str(exc).splitlines()[0])
    summary = {"out": str(report.out_dir), "shards": report.shards, "tensors": report.tensors,
               "merged": report.merged}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {report.out_dir}: {report.merged} merged of {report.tensors} tensors "
              f"in {report.shards} shard(s)")  # fmt: skip
    return 0


def _progress(total: int, *, quiet: bool):  # type: ignore[no-untyped-def]
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr)
