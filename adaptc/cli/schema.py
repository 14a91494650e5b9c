"""``adaptc schema``: the JSON Schema of adapter specs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaptc.atomic import atomic_write_text
from adaptc.cli._common import add_command, fail
from adaptc.spec.docs import field_reference, splice_reference
from adaptc.spec.schema import json_schema_text


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "schema",
        "Print the JSON Schema of adapter specs (generated from the spec models).",
        """
        adaptc schema > adapter-spec.v1.json
        adaptc schema --out schemas/adapter-spec.v1.json
        adaptc schema --check schemas/adapter-spec.v1.json   # exit 1 when stale
        adaptc schema --format markdown                      # the field reference
        adaptc schema --format markdown --out docs/spec.md   # refresh it between the markers
        adaptc schema --format markdown --check docs/spec.md
        """,
    )
    p.add_argument(
        "--format",
        choices=("json", "markdown"),
        default="json",
        help="json (the schema, default) or markdown (the field reference of docs/spec.md)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--out", metavar="FILE", help="write the schema to FILE (atomically)")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the schema")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    text = field_reference() if args.format == "markdown" else json_schema_text()
    target = args.check or args.out
    if args.format == "markdown" and target:
        # a markdown file with the reference markers gets the reference spliced in
        try:
            text = splice_reference(Path(target).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return fail("schema", f"cannot update {target}: {exc}")
    if args.check:
        path = Path(args.check)
        if not path.is_file():
            return fail("schema", f"no such file: {path}")
        if path.read_text(encoding="utf-8") != text:
            return fail(
                "schema", f"{path} is stale; regenerate it with: adaptc schema --out {path}"
            )
        print(f"{path} is up to date")
        return 0
    if args.out:
        try:
            atomic_write_text(args.out, text)
        except OSError as exc:
            return fail("schema", f"cannot write {args.out}: {exc.strerror or exc}")
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0
