"""Shared paths for the tests."""

from __future__ import annotations

import os
from pathlib import Path

# No test reaches a real hub: huggingface_hub reads this when it is first imported. Tests
# of downloads run their commands in subprocesses pointed at tests/hub_server.py.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_ENDPOINT", None)

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "specs" / "examples"
BAD_SPECS = ROOT / "tests" / "data" / "bad_specs"


@pytest.fixture
def write(tmp_path: Path):
    """Write a file under tmp_path and return its path."""

    def _write(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    return _write


@pytest.fixture
def fresh_dynamo():
    """A clean torch.compile state before and after the test, its warnings silenced."""
    import warnings

    import torch._dynamo

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    torch._dynamo.reset()
