"""``adaptc.atomic``: the one implementation of temp-then-rename writes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import adaptc
from adaptc import atomic
from adaptc.atomic import atomic_write_text, staged_files

PACKAGE = Path(adaptc.__file__).parent


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def write(staging: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_text(text)


def test_atomic_write_text_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert leftovers(tmp_path) == []


def test_staged_files_makes_a_new_directory_appear_whole(tmp_path):
    target = tmp_path / "a" / "adapter"
    files = {"w.bin": "weights", "sub/config.json": "{}"}
    with staged_files(target, list(files)) as staging:
        write(staging, files)
        assert not target.exists()
        assert staging.parent == target.parent
    assert {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()} == set(files)
    assert (target / "sub" / "config.json").read_text() == "{}"
    assert leftovers(target.parent) == []


def test_staged_files_replaces_files_of_an_existing_directory_in_order(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    (target / "sub").mkdir(parents=True)
    (target / "config.json").write_text("old config")
    (target / "trainer_state.json").write_text("kept")
    moved: list[str] = []
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        moved.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    files = {"config.json": "new config", "w.bin": "weights", "new/x.txt": "x"}
    with staged_files(target, ["w.bin", "new/x.txt", "config.json"]) as staging:
        write(staging, files)
    assert moved == ["w.bin", "x.txt", "config.json"]
    assert (target / "config.json").read_text() == "new config"
    assert (target / "new" / "x.txt").read_text() == "x"
    assert (target / "trainer_state.json").read_text() == "kept"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exists", [False, True])
def test_staged_files_changes_nothing_when_the_block_fails(tmp_path, exists):
    target = tmp_path / "adapter"
    if exists:
        target.mkdir()
        (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), staged_files(target, ["config.json"]) as s:
        write(s, {"config.json": "new"})
        raise RuntimeError("boom")
    assert leftovers(tmp_path) == []
    if exists:
        assert (target / "config.json").read_text() == "old"
    else:
        assert not target.exists()


def test_staged_files_fails_before_renaming_when_a_listed_file_was_not_written(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(FileNotFoundError), staged_files(target, ["a", "b"]) as staging:
        write(staging, {"a": "only a"})
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_no_other_module_renames_temp_files_itself():
    """Every temp-then-rename write goes through adaptc.atomic."""
    pattern = re.compile(r"\bos\.(replace|rename)\(|mkstemp|mkdtemp|NamedTemporaryFile")
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "atomic.py" and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
