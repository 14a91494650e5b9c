"""``adaptc validate PATH...``: check spec files, for people and for CI."""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import TYPE_CHECKING

from adaptc.cli._common import add_command, fail
from adaptc.spec import SpecIssue, spec_from_data
from adaptc.spec.errors import one_line
from adaptc.spec.load import check_file_report
from adaptc.spec.source import read_document

if TYPE_CHECKING:
    from torch import nn

    # lazily: the library imports torch; the CLI starts without it
    from adaptc.models import ModelError, ModelRef

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
        pre-commit run adaptc-validate --all-files  # the hook in .pre-commit-hooks.yaml
        adaptc validate specs/ --model ./checkpoints/opt-350m  # and their targets match it
        """,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="spec files, directories or globs")
    p.add_argument(
        "--format",
        choices=("text", "json", "github"),
        default="text",
        help="text (default), json, or github (::error and ::warning annotations)",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only the errors (no warnings, no summary)"
    )
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="also plan each valid spec on MODEL (built on the meta device, no weight read): "
        "a spec whose targets match nothing is an error (model directory, config.json, "
        "hub id in the local cache, or package.module:factory)",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="Hugging Face cache to look in for --model")
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
    except (ValueError, OSError) as exc:  # OSError: a path the system refuses (too long)
        return fail("validate", str(exc), 2)
    reports = {str(f): check_file_report(f) for f in files}
    results = {name: list(report.errors) for name, report in reports.items()}
    warnings: dict[str, list[str]] = {}
    if args.model:  # only now: the model check needs torch and transformers
        # lazily: the library imports torch; the CLI starts without it
        from adaptc.models import ModelError, resolve_model

        try:
            ref = resolve_model(args.model, cache_dir=args.cache_dir)
        except ModelError as exc:
            return fail("validate", str(exc), 2)
        models: dict[str | None, nn.Module | ModelError] = {}  # one meta model per task_type
        for path in files:
            if not results[str(path)]:
                results[str(path)], warnings[str(path)] = _check_on_model(path, ref, models)
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
                | {"parser_warnings": [i.to_dict() for i in reports[f].warnings]}
                | ({"warnings": warnings.get(f, [])} if args.model else {})
                for f, issues in results.items()
            ],
            "summary": {"files": len(files), "invalid": invalid, "errors": errors},
        }
        print(json.dumps(payload, indent=2))
    else:
        for name, issues in results.items():
            for issue in issues:
                print(_github(issue) if args.format == "github" else str(issue))
            if not args.quiet:
                for issue in reports[name].warnings:
                    github = args.format == "github"
                    print(_github(issue, "warning") if github else issue.render("warning"))
                for message in warnings.get(name, []):
                    print(
                        _github_warning(name, message)
                        if args.format == "github"
                        else f"{name}: warning: {message}"
                    )
        if not args.quiet:
            print(summary)
    return 1 if invalid else 0


def _check_on_model(
    path: Path, ref: ModelRef, models: dict[str | None, nn.Module | ModelError]
) -> tuple[list[SpecIssue], list[str]]:
    """Plan each adapter of a valid spec on the model: (errors, warnings)."""
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.models import ModelError, build_model
    from adaptc.plan.plan import build_plan

    doc = read_document(path)
    spec = spec_from_data(doc.data, doc)
    if spec.task_type not in models:
        try:
            models[spec.task_type] = build_model(ref, task_type=spec.task_type, meta=True)
        except ModelError as exc:
            models[spec.task_type] = exc
    model = models[spec.task_type]
    if isinstance(model, ModelError):
        return [doc.issue(("task_type",), "task_type", str(model))], []
    issues: list[SpecIssue] = []
    warnings: list[str] = []
    for name, adapter in spec.adapters.items():
        try:  # one adapter at a time, so an error names its adapter
            plan = build_plan(model, spec.model_copy(update={"adapters": {name: adapter}}))
        except ValueError as exc:
            issues.append(doc.issue(("adapters", name), f"adapters.{name}", str(exc)))
            continue
        warnings.extend(f"adapters.{name}: {w}" for w in plan.warnings)
    return issues, warnings


def _github(issue: SpecIssue, command: str = "error") -> str:
    """A GitHub Actions workflow command: ``::error file=…,line=…,col=…::message``."""
    props = [f"file={_escape_property(issue.file or '')}"]
    if issue.line is not None:
        props.append(f"line={issue.line}")
    if issue.column is not None:
        props.append(f"col={issue.column}")
    props.append("title=adaptc validate")
    message = one_line(f"{issue.field}: {issue.message}")
    return f"::{command} {','.join(props)}::{_escape_data(message)}"


def _github_warning(file: str, message: str) -> str:
    props = f"file={_escape_property(file)},title=adaptc validate"
    return f"::warning {props}::{_escape_data(one_line(message))}"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
