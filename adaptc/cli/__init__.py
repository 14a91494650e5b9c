"""The ``adaptc`` command line: parse, call the library, print."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from adaptc import __version__
from adaptc.cli import (
    compile,
    convert,
    convert_adapter,
    inspect,
    merge,
    plan,
    schema,
    validate,
)
from adaptc.logs import quiet_import_time_loggers

__all__ = ["main"]

# the order of `adaptc --help`
_COMMANDS = (validate, schema, convert, inspect, plan, compile, merge, convert_adapter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptc",
        description="Declarative LoRA adapters for PyTorch: "
        "validate specs, compile them onto models.",
    )
    parser.add_argument("--version", action="version", version=f"adaptc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 invalid input, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_import_time_loggers()
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("adaptc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `adaptc plan ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
