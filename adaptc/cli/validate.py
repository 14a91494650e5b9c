"""``adaptc validate PATH...``: check spec files, for people and for CI."""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from adaptc.cli._common import add_command, fail
from adaptc.spec import SpecIssue, check_file

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "validate",
        "Check adapter specs (YAML, JSON or PEFT adapter_config.json). "
        "Exit 0 when all are valid, 1 when any is invalid, 2 on usage errors.",
        """
        adaptc validate specs/                      # every *.yaml, *.yml, *.json below
        adaptc validate 'specs/**/*.yaml' my.json   # globs and files
        adaptc validate --format github specs/      # annotations in GitHub Actions
        """,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="spec files, directories or globs")
    p.add_argument(
        "--format",
        choices=("text", "json", "github"),
        default="text",
        help="text (default), json, or github (::error annotations)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the errors")
    p.set_defaults(run=run)


def expand(paths: list[str]) -> list[Path]:
    """Files named by ``paths``; ValueError for a path that names nothing."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.suffix.lower() in SPEC_SUFFIXES
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"no spec files (*.yaml, *.yml, *.json) under {raw}")
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True) if Path(m).is_file())
            if not matches:
                raise ValueError(f"no files match {raw}")
            files.extend(matches)
        else:
            raise ValueError(f"no such file or directory: {raw}")
    return list(dict.fromkeys(files))


def run(args: argparse.Namespace) -> int:
    try:
        files = expand(args.paths)
    except ValueError as exc:
        return fail("validate", str(exc), 2)
    results = {str(f): check_file(f) for f in files}
    invalid = sum(1 for issues in results.values() if issues)
    errors = sum(len(issues) for issues in results.values())
    summary = (
        f"{len(files)} file{'s' if len(files) != 1 else ''} checked: {len(files) - invalid} valid"
    )
    if invalid:
        summary += f", {invalid} invalid ({errors} error{'s' if errors != 1 else ''})"
    if args.format == "json":
        payload = {
            "files": [
                {"file": f, "valid": not issues, "errors": [i.to_dict() for i in issues]}
                for f, issues in results.items()
            ],
            "summary": {"files": len(files), "invalid": invalid, "errors": errors},
        }
        print(json.dumps(payload, indent=2))
    else:
        for issues in results.values():
            for issue in issues:
                print(_github(issue) if args.format == "github" else str(issue))
        if not args.quiet:
            print(summary)
    return 1 if invalid else 0


def _github(issue: SpecIssue) -> str:
    """A GitHub Actions workflow command: ``::error file=…,line=…,col=…::message``."""
    props = [f"file={_escape_property(issue.file or '')}"]
    if issue.line is not None:
        props.append(f"line={issue.line}")
    if issue.column is not None:
        props.append(f"col={issue.column}")
    props.append("title=adaptc validate")
    return f"::error {','.join(props)}::{_escape_data(f'{issue.field}: {issue.message}')}"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
