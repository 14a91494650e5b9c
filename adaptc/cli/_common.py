"""Small helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import sys
import textwrap

# --dtype choices (the spec's names); adaptc.models.DTYPES maps them to torch dtypes (the
# CLI imports torch only when a command needs it; the spec does not import it)
from adaptc.spec.quantization import DTYPE_NAMES

__all__ = ["DTYPE_NAMES", "add_command", "fail", "spec_source"]


def add_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    summary: str,
    examples: str,
) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` ends with usage examples."""
    return sub.add_parser(  # type: ignore[no-any-return]
        name,
        help=summary,
        description=summary,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def fail(command: str, message: str, code: int = 1) -> int:
    """Print ``adaptc COMMAND: error: message`` on stderr and return ``code``."""
    print(f"adaptc {command}: error: {message}", file=sys.stderr)
    return code


def spec_source(text: str, cache_dir: str | None = None) -> str:
    """A local path for a SPEC argument: ``text`` itself, or, for a hub id (``org/name``)
    that names no local path, the adapter repo downloaded (its ``adapter_config.json`` or
    ``adaptc_spec.yaml``). Raises ``ValueError`` (one line) when the download fails."""
    from pathlib import Path

    # lazily: huggingface_hub is imported when needed
    from adaptc.hub import is_hub_id

    if Path(text).exists() or text.count("/") != 1 or not is_hub_id(text):
        return text
    from adaptc.io.load import resolve_adapter_dir  # lazily: it imports torch

    return str(resolve_adapter_dir(text, cache_dir=cache_dir))
