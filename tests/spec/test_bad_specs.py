"""Every broken spec gives its exact one-line messages, with line and column."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from adaptc.spec import SpecError, check_file, load_spec
from adaptc.spec.source import MAX_BYTES
from tests.conftest import BAD_SPECS

EXPECTED = YAML(typ="safe").load((BAD_SPECS / "expected.yaml").read_text(encoding="utf-8"))
CASES = sorted(p.name for p in BAD_SPECS.iterdir() if p.name != "expected.yaml")


def _lines(path: Path) -> list[str]:
    return [str(i).removeprefix(f"{path}:").lstrip() for i in check_file(path)]


def test_corpus_is_large_and_every_file_has_expectations():
    assert len(CASES) >= 30
    assert sorted(EXPECTED) == CASES


@pytest.mark.parametrize("name", CASES)
def test_bad_spec_gives_expected_messages(name: str):
    path = BAD_SPECS / name
    assert _lines(path) == EXPECTED[name]["errors"]


@pytest.mark.parametrize("name", CASES)
def test_bad_spec_errors_are_located_single_lines(name: str):
    issues = check_file(BAD_SPECS / name)
    assert issues, "a bad spec must give at least one error"
    for issue in issues:
        assert "\n" not in str(issue)
        assert "Traceback" not in str(issue)
        assert issue.file == str(BAD_SPECS / name)
        if issue.field not in ("file",):  # whole-file problems (empty) have no line
            assert issue.line is not None and issue.column is not None


@pytest.mark.parametrize("name", CASES)
def test_load_spec_raises_spec_error_with_the_same_issues(name: str):
    path = BAD_SPECS / name
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [str(i) for i in info.value.issues] == [str(i) for i in check_file(path)]


def test_many_errors_are_all_reported():
    assert len(EXPECTED["many-errors.yaml"]["errors"]) == 5


def test_oversized_file_is_refused_without_reading_it(write):
    path = write("huge.yaml", b"")
    with path.open("wb") as fh:  # a 50 MB file, sparse: no need to write the bytes
        fh.truncate(50 * 1024 * 1024)
    start = time.perf_counter()
    assert _lines(path) == ["file: file is 50.0 MB; a spec file is at most 1.0 MB"]
    assert time.perf_counter() - start < 1.0


def test_file_just_over_the_limit_is_refused(write):
    path = write("big.yaml", "# " + "x" * MAX_BYTES)
    assert _lines(path)[0].startswith("file: file is 1.0 MB; a spec file is at most 1.0 MB")


def test_directory_is_not_a_spec_file(tmp_path: Path):
    (tmp_path / "d.yaml").mkdir()
    assert _lines(tmp_path / "d.yaml") == ["file: is a directory, not a spec file"]


def test_missing_file(tmp_path: Path):
    assert _lines(tmp_path / "nope.yaml") == ["file: no such file"]


def test_adapter_directory_without_spec(tmp_path: Path):
    with pytest.raises(SpecError, match=r"is a directory without adaptc_spec\.yaml"):
        load_spec(tmp_path)


def test_deep_nesting_is_bounded(write):
    path = write("deep.yaml", "version: 1\nadapters: " + "[" * 5000 + "]" * 5000 + "\n")
    start = time.perf_counter()
    (line,) = _lines(path)
    assert "nested" in line
    assert time.perf_counter() - start < 5.0


def test_alias_bomb_is_bounded_in_time():
    start = time.perf_counter()
    check_file(BAD_SPECS / "alias-bomb.yaml")
    assert time.perf_counter() - start < 5.0


def test_backtracking_regex_is_never_run(write):
    # the classic ReDoS shape would take hours on this name; validation only inspects it
    path = write(
        "redos.yaml",
        "version: 1\nadapters:\n  a:\n    targets: {kind: regex, pattern: '(a+)+$'}\n",
    )
    start = time.perf_counter()
    assert "backtrack catastrophically" in _lines(path)[0]
    assert time.perf_counter() - start < 1.0


def test_python_tags_are_never_constructed(write, tmp_path: Path):
    marker = tmp_path / "pwned"
    path = write(
        "evil.yaml",
        f"version: 1\nadapters:\n  a: !!python/object/apply:os.system ['touch {marker}']\n",
    )
    assert "unsupported YAML tag '!!python/object/apply:os.system'" in _lines(path)[0]
    assert not marker.exists()


def test_utf8_bom_is_accepted(write):
    path = write("bom.yaml", "\ufeffversion: 1\nadapters:\n  default: {}\n")
    assert check_file(path) == []


def test_errors_in_a_dict_have_paths_but_no_positions():
    with pytest.raises(SpecError) as info:
        load_spec({"version": 1, "adapters": {"default": {"r": 0}}})
    assert str(info.value) == "adapters.default.r: must be > 0, got 0"
