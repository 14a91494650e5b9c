"""``adaptc convert``: adaptc spec ⇄ PEFT ``adapter_config.json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptc.atomic import atomic_write_text
from adaptc.cli._common import add_command, fail, spec_source
from adaptc.spec import Spec, SpecError, is_peft_config, spec_from_data
from adaptc.spec.dump import dump_spec
from adaptc.spec.load import PEFT_CONFIG_NAME, resolve_spec_path
from adaptc.spec.source import read_document


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "convert",
        "Convert between an adaptc spec and PEFT's adapter_config.json "
        "(direction chosen from the input unless --to is given).",
        """
        adaptc convert specs/examples/seed-opt-350m.yaml            # PEFT JSON on stdout
        adaptc convert peft_dir/adapter_config.json -o my-spec.yaml  # PEFT -> adaptc spec
        adaptc convert multi.yaml --out peft_dir/                    # one folder per adapter
        """,
    )
    p.add_argument("source", metavar="SRC", help="spec file, adapter_config.json or adapter dir")
    p.add_argument("-o", "--out", metavar="OUT", help="output file (or directory for --to peft)")
    p.add_argument("--to", choices=("peft", "spec"), help="output format (default: the other one)")
    p.add_argument("--adapter", metavar="NAME", help="convert only this adapter (--to peft)")
    p.add_argument("--format", choices=("yaml", "json"), help="spec output format (default yaml)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        doc = read_document(resolve_spec_path(Path(spec_source(args.source))))
        spec = spec_from_data(doc.data, doc)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError as exc:  # a hub id that cannot be fetched
        return fail("convert", str(exc))
    to = args.to or ("spec" if is_peft_config(doc.data) else "peft")
    try:
        if to == "spec":
            fmt = args.format or ("json" if str(args.out or "").endswith(".json") else "yaml")
            return _emit(args.out, dump_spec(spec, fmt))
        names = [args.adapter] if args.adapter else list(spec.adapters)
        for name in names:
            if name not in spec.adapters:
                return fail("convert", f"no adapter {name!r} in {args.source}")
        out = Path(args.out) if args.out else None
        as_dir = out is not None and (out.is_dir() or str(args.out).endswith(("/", "\\")))
        if len(names) == 1 and not as_dir:
            return _emit(args.out, _peft_json(spec, names[0]))
        if out is None:
            return fail(
                "convert",
                f"spec has {len(names)} adapters ({', '.join(names)}): choose one with "
                "--adapter NAME, or write PEFT's layout with --out DIR/",
            )
        for name in names:  # PEFT's layout: "default" at the top, others in sub-folders
            folder = out if name == "default" else out / name
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / PEFT_CONFIG_NAME, _peft_json(spec, name))
            print(f"wrote {folder / PEFT_CONFIG_NAME}", file=sys.stderr)
        return 0
    except ValueError as exc:
        return fail("convert", str(exc))
    except OSError as exc:
        return fail("convert", f"cannot write {exc.filename or args.out}: {exc.strerror or exc}")


def _peft_json(spec: Spec, name: str) -> str:
    return json.dumps(spec.to_peft_config(name), indent=2) + "\n"


def _emit(out: str | None, text: str) -> int:
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
        print(f"wrote {out}", file=sys.stderr)
    return 0
