"""The ``adaptc`` command line: parse, call the library, print."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from adaptc import __version__
from adaptc.cli import compile, convert, inspect, merge, plan, schema, validate

__all__ = ["main"]

# the order of `adaptc --help`
_COMMANDS = (validate, schema, convert, inspect, plan, compile, merge)


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
    _quiet_imports()
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("adaptc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `adaptc plan ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# Loggers that speak at import time, not about the user's work: torchao (installed with the
# quant extra; transformers imports it with any model class) warns that its CUDA kernels
# do not load on a CPU, and registers enums torch's pytree logs about.
_IMPORT_TIME_LOGGERS = ("torchao", "torch.utils._pytree")


def _quiet_imports() -> None:
    for name in _IMPORT_TIME_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
