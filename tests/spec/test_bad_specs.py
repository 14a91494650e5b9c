"""Every broken spec gives its exact one-line messages, with line and column."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from adaptc.spec import SpecError, SpecIssue, check_file, load_spec
from adaptc.spec.errors import SpecWarning
from adaptc.spec.load import check_file_report
from adaptc.spec.source import MAX_BYTES, parse_text
from tests.conftest import BAD_SPECS, EXAMPLES

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


# --- found by tests/spec/test_fuzz.py: each was a traceback, a wrong value or a split line --


def test_a_path_the_system_refuses_is_an_error_not_a_traceback():
    with pytest.raises(SpecError, match=r": file: cannot read: File name too long$"):
        load_spec("x" * 5000 + ".yaml")


def test_nested_merge_keys_merge_all_the_way_down(write):
    path = write(
        "merge.yaml",
        "version: 1\nadapters:\n"
        "  a: &a {r: 4, lora_alpha: 4}\n"
        "  b: &b {<<: *a, lora_alpha: 8}\n"  # a merge whose source has a merge of its own
        "  c: {<<: [*b, {r: 16, lora_dropout: 0.5}], lora_dropout: 0.1}\n",
    )
    spec = load_spec(path)
    c = spec.adapters["c"]  # explicit keys win, then the earlier source, then the later
    assert (c.r, c.lora_alpha, c.lora_dropout) == (4, 8, 0.1)


def test_keys_are_read_as_written():
    text = "version: 1\nadapters:\n  d:\n    rank_pattern: {1: 4, true: 8, 0x1f: 2, null: 3}\n"
    data = parse_text(text).data
    assert list(data["adapters"]["d"]["rank_pattern"]) == ["1", "true", "0x1f", "null"]


def test_json_surrogate_pairs_are_one_character():
    text = '{"version": 1, "adapters": {"d": {"modules_to_save": ["head\\ud83d\\ude00"]}}}'
    assert parse_text(text, as_json=True).data["adapters"]["d"]["modules_to_save"] == ["head😀"]


def test_deep_nesting_is_refused_where_it_goes_too_deep(write):
    path = write("deep.json", '{"version": 1, "adapters": ' + "[" * 3000 + "]" * 3000 + "}")
    assert _lines(path) == ["1:92: yaml: nested more than 64 levels deep"]


def test_too_many_values_are_refused_before_the_whole_file_is_read(write):
    text = "version: 1\nx: [" + ",".join(["1"] * 60_000) + "]\n"
    path = write("many.yaml", text)
    (line,) = _lines(path)
    # refused at the 50,001st value, column 99,995 of a 120,004-character line: the rest
    # is never composed (how long that takes is the benchmarks' business, not a unit test's)
    assert line == "2:99995: yaml: more than 50000 values: a spec file holds at most 50000"
    assert len(text.splitlines()[1]) > 99_995


def test_a_mistake_repeated_thousands_of_times_is_reported_a_hundred_times(write):
    names = ",".join(f"'layer {i}'" for i in range(5000))  # spaces: every name is invalid
    path = write("names.yaml", f"version: 1\nadapters:\n  d:\n    modules_to_save: [{names}]\n")
    lines = _lines(path)
    assert len(lines) == 101
    assert lines[0].endswith(
        "modules_to_save.0: invalid name 'layer 0': no spaces, no empty "
        "or leading/trailing '.' segments"
    )
    assert lines[-1].endswith("modules_to_save.100: and 4900 more errors, not shown")


def test_issue_lines_stay_single_whatever_the_names():
    issue = SpecIssue("dir\nname.yaml", 3, 4, "adapters.a\u2028b", "bad\rvalue\x0c")
    assert str(issue) == "dir\\nname.yaml:3:4: adapters.a\\u2028b: bad\\rvalue\\x0c"
    assert len(str(issue).splitlines()) == 1


# --- warnings: what YAML itself warns about is a located line, not library noise ------------

REUSED_ANCHOR = "version: 1\nadapters:\n  a: &x {r: 8}\n  b: &x {r: 4}\n  c: *x\n"


def test_a_reused_anchor_is_one_located_warning(write):
    path = write("anchors.yaml", REUSED_ANCHOR)
    with pytest.warns(SpecWarning) as caught:
        spec = load_spec(path)
    assert [str(w.message) for w in caught] == [
        f"{path}:4:6: yaml: duplicate anchor &x (first at line 3); "
        "aliases *x after this line refer to this one"
    ]
    assert caught[0].filename == __file__  # points at the caller of load_spec
    assert spec.adapters["c"].r == 4  # as YAML says: the alias takes the latest anchor
    report = check_file_report(path)
    assert report.errors == () and [str(w) for w in report.warnings] == [str(caught[0].message)]


def test_other_yaml_library_warnings_are_located_warnings_too(write):
    # ruamel warns (through `warnings`, over 15 lines) about YAML 1.1 floats without a dot
    path = write("yaml11.yaml", "%YAML 1.1\n---\nversion: 1\nadapters:\n  d: {lora_alpha: 1e5}\n")
    with pytest.warns(SpecWarning) as caught:
        load_spec(path)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{path}:5:19: yaml: In YAML 1.1 floating point values should")
    assert len(message.splitlines()) == 1


def test_warnings_of_a_file_with_errors_are_kept(write):
    path = write("both.yaml", REUSED_ANCHOR.replace("r: 4", "r: 0"))
    report = check_file_report(path)
    assert [str(i).split(":", 1)[1] for i in report.errors] == [
        "4:13: adapters.b.r: must be > 0, got 0",
        "4:13: adapters.c.r: must be > 0, got 0",
    ]
    assert [i.line for i in report.warnings] == [4]


def test_spec_files_load_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in sorted(EXAMPLES.iterdir()):
            load_spec(path)
