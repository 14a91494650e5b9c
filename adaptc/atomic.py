"""Atomic writes: a temp file (or directory) beside the target, then ``os.replace``.

The one implementation of temp-then-rename writes in adaptc:

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: one file;
- :func:`staged_dir`: a whole directory, which appears whole or not at all (a janitor
  process cleans up after a killed writer);
- :func:`staged_files`: files inside a directory: a new directory appears whole, in an
  existing one each file is replaced atomically and the others are kept.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "staged_dir",
    "staged_files",
    "staging_dir",
]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# Run by a separate process: waits until its stdin closes (the writer finished, or died,
# even by SIGKILL), then removes what the writer left half-done.
_JANITOR = """
import os, shutil, sys
sys.stdin.buffer.read()
staging, old, out = sys.argv[1:4]
shutil.rmtree(staging, ignore_errors=True)
if os.path.isdir(old):
    if os.path.exists(out):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, out)
"""


def staging_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` (``.NAME.XXXXXXXX.partial``), with the mode a
    plain ``mkdir`` gives (``tempfile.mkdtemp``'s 0o700 would become the output's mode)."""
    parent = target.parent if str(target.parent) else Path()
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = parent / f".{target.name}.{secrets.token_hex(4)}.partial"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


@contextmanager
def staged_dir(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Make the directory ``out`` appear whole or not at all.

    Yields an empty staging directory beside ``out``; when the block succeeds it is renamed
    to ``out`` (an existing ``out`` is replaced only with ``replace``). If the block fails,
    the staging directory is removed; if the process is killed (SIGKILL included), a small
    janitor process started here removes it, and puts back an ``out`` that was being
    replaced. Nothing half-written is left beside ``out``.
    """
    target = Path(out)
    staging = staging_dir(target)
    old = staging.with_name(staging.name.removesuffix(".partial") + ".old")
    janitor = subprocess.Popen(
        [sys.executable, "-c", _JANITOR, str(staging), str(old), str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a kill of our process group leaves it running
    )
    try:
        yield staging
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} exists; pass --force to replace it")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)  # the whole directory appears at once
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        assert janitor.stdin is not None
        janitor.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # it only removes files
            janitor.wait(timeout=10)


@contextmanager
def staged_files(out: str | Path, files: Sequence[str | Path]) -> Iterator[Path]:
    """Write ``files`` (paths relative to the directory ``out``) into ``out`` atomically.

    Yields an empty staging directory beside ``out``, in which the block writes each of
    ``files``. When the block succeeds, each file is fsynced; a missing ``out`` is then the
    staging directory renamed (it appears whole at once), while in an existing ``out`` each
    file is replaced atomically, in the order given, and the other files there are kept.
    The staging directory is removed in any case. Unlike :func:`staged_dir` there is no
    janitor: a writer killed mid-block may leave the ``.NAME.XXXXXXXX.partial`` directory.
    """
    target = Path(out)
    rels = [Path(rel) for rel in files]
    staging = staging_dir(target)
    try:
        yield staging
        for rel in rels:
            with (staging / rel).open("rb") as fh:
                os.fsync(fh.fileno())
        if not target.exists():
            os.replace(staging, target)  # the whole directory appears at once
            return
        for rel in rels:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
