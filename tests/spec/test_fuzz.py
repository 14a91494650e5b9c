"""The spec loader under property-based fuzzing: whatever the bytes, a spec or located lines.

Random documents (YAML and JSON), mutated example specs (as data and as text), and random
bytes go through ``load_spec`` and ``adaptc validate``. Each must give a valid spec or a
``SpecError`` whose issues are one line each, with line and column wherever the problem
has a place in the file; never a traceback, and never slowly. Bombs (aliases, nesting,
huge numbers, huge files) are refused in bounded time and memory.

The suite runs a fixed, small budget (``derandomize``); ``HYPOTHESIS_PROFILE=long`` runs
a long random search (docs/development.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from adaptc.cli import main
from adaptc.spec import SpecError, load_spec
from adaptc.spec.errors import SpecWarning
from adaptc.spec.load import check_file_report
from adaptc.spec.schema import json_schema
from adaptc.spec.source import MAX_BYTES, MAX_DEPTH, MAX_INT_DIGITS, parse_text, read_document
from tests.conftest import BAD_SPECS, EXAMPLES

_PROFILES: dict[str, dict[str, Any]] = {
    # the suite: the same examples on every run, a budget of a few seconds per test
    "ci": {"max_examples": 100, "derandomize": True},
    # a search: `HYPOTHESIS_PROFILE=long pytest tests/spec/test_fuzz.py` (~10 min on 2 cores)
    "long": {"max_examples": 3000, "derandomize": False, "print_blob": True},
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(
    **_PROFILES.get(PROFILE, _PROFILES["ci"]),
    deadline=None,  # 2 shared cores: per-example time is checked by the tests themselves
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 4))  # the CLI runs, slower
SECONDS = 2.0  # CPU seconds per document; these take milliseconds

EXAMPLE_FILES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".json"))
EXAMPLE_DATA = [read_document(p).data for p in EXAMPLE_FILES]
EXAMPLE_TEXTS = [p.read_text(encoding="utf-8") for p in EXAMPLE_FILES]
PEFT_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}
SEEDS = [*EXAMPLE_DATA, PEFT_CONFIG]


def _schema_words(node: Any) -> set[str]:
    """Every field name and every allowed string value in the spec's JSON Schema."""
    words: set[str] = set()
    if isinstance(node, dict):
        words |= set(node.get("properties", {}))
        words |= {v for v in [*node.get("enum", []), node.get("const")] if isinstance(v, str)}
        for value in node.values():
            words |= _schema_words(value)
    elif isinstance(node, list):
        for value in node:
            words |= _schema_words(value)
    return words


# the words a spec (or PEFT's config) is made of: the fuzzer's way to valid-looking keys
SPEC_WORDS = sorted(
    _schema_words(json_schema()) | {"default", "q_proj", "peft_type", "LORA", "target_modules"}
)

_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")

# --- strategies ---------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**120), max_value=10**120),
    st.floats(),
    _text,
    st.sampled_from(SPEC_WORDS),
)
keys = st.one_of(_text, st.sampled_from(SPEC_WORDS))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=40,
)
# characters that steer YAML's scanner, and the words of a spec
yaml_alphabet = st.sampled_from(
    [*":-[]{},&*!|>'\"%@`#?~ \t\n\r\\<=.0123456789eE+_", "<<", "---", "...", *SPEC_WORDS]
)
yaml_ish = st.lists(yaml_alphabet, max_size=60).map("".join)


@st.composite
def mutated_data(draw: st.DrawFn) -> Any:
    """An example spec (or PEFT config) with a few values replaced, deleted or renamed."""
    data = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 4))):
        path = _random_path(draw, data)
        parent, key = _resolve(data, path)
        if parent is None:
            data = draw(documents)
            continue
        action = draw(st.sampled_from(["replace", "delete", "rename", "insert"]))
        if action == "replace":
            parent[key] = draw(documents)
        elif action == "delete":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(keys)] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(documents)
        else:
            parent.insert(key, draw(documents))
    return data


def _random_path(draw: st.DrawFn, data: Any) -> list[Any]:
    path: list[Any] = []
    while isinstance(data, (dict, list)) and data and draw(st.booleans()):
        key = draw(st.sampled_from(list(data) if isinstance(data, dict) else range(len(data))))
        path.append(key)
        data = data[key]
    return path


def _resolve(data: Any, path: list[Any]) -> tuple[Any, Any]:
    if not path:
        return None, None
    for key in path[:-1]:
        data = data[key]
    return data, path[-1]


@st.composite
def mutated_text(draw: st.DrawFn) -> tuple[str, str]:
    """An example spec file with characters inserted, deleted, duplicated or lines swapped."""
    index = draw(st.integers(0, len(EXAMPLE_TEXTS) - 1))
    text = EXAMPLE_TEXTS[index]
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        action = draw(st.sampled_from(["insert", "delete", "duplicate", "swap"]))
        if action == "insert":
            text = text[:i] + draw(yaml_ish) + text[i:]
        elif action == "delete":
            text = text[:i] + text[j:]
        elif action == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        else:
            lines = text.splitlines(keepends=True)
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            text = "".join(lines)
    return EXAMPLE_FILES[index].suffix, text


# --- the properties -----------------------------------------------------------------------


def _dump_yaml(data: Any) -> str:
    stream = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.width = 4096
    yaml.sort_base_mapping_type_on_output = False  # keep the order written
    yaml.dump(data, stream)
    return stream.getvalue()


def _write(tmp_path_factory: pytest.TempPathFactory, suffix: str, content: str | bytes) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / f"spec{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    return path


def _check_loader(path: Path, seconds: float = SECONDS) -> list[str]:
    """``load_spec`` gives a spec or a SpecError of located one-liners; returns the lines."""
    text = path.read_bytes().decode("utf-8", "replace")
    n_lines = len(_LINE_BREAK.split(text))  # YAML breaks lines at \r too
    start = time.process_time()  # CPU time: other processes on the machine do not count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_spec(path)
            issues: tuple[Any, ...] = ()
        except SpecError as exc:
            issues = exc.issues
    assert time.process_time() - start < seconds
    assert all(issubclass(w.category, SpecWarning) for w in caught), [str(w) for w in caught]
    report = check_file_report(path)
    assert [str(i) for i in report.errors] == [str(i) for i in issues]
    assert [str(w.message) for w in caught] == [str(i) for i in report.warnings]
    for issue in (*issues, *report.warnings):
        line = str(issue)
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert issue.file == str(path)
        if issue.field != "file":  # only whole-file problems (empty, unreadable) lack a place
            assert issue.line is not None and issue.column is not None, line
            assert 1 <= issue.line <= n_lines + 1, line
    return [str(i) for i in issues]


def _check_cli(path: Path) -> None:
    """``adaptc validate`` exits 0 or 1 and prints only located lines and its summary."""
    valid = not check_file_report(path).errors
    for fmt in ("text", "github", "json"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["validate", "--format", fmt, str(path)])
        assert code == (0 if valid else 1)
        assert err.getvalue() == ""
        if fmt == "json":
            assert json.loads(out.getvalue())["files"][0]["valid"] is valid
            continue
        *lines, summary = out.getvalue().splitlines()
        assert re.fullmatch(r"1 file checked: .*", summary)
        for line in lines:
            if fmt == "text":
                assert line.startswith(f"{path}:"), line
            else:
                assert re.match(r"::(error|warning) file=", line), line


@FUZZ
@given(data=documents, as_json=st.booleans())
@example(data={"version": 1, "adapters": {"a\nb": {}}}, as_json=False)
@example(data={"version": 1, "adapters": {"a": {"r": 10**200}}}, as_json=True)
@example(data={"version": 1, "adapters": {"\ud83d\ude00": {}}}, as_json=True)
def test_random_documents(tmp_path_factory, data, as_json):
    text = json.dumps(data) if as_json else _dump_yaml(data)
    _check_loader(_write(tmp_path_factory, ".json" if as_json else ".yaml", text))


@FUZZ
@given(data=documents, as_json=st.booleans())
def test_documents_read_back_as_json_and_yaml_readers_do(data, as_json):
    """What json.dumps or a YAML dumper wrote reads back as :mod:`json` or ruamel's own
    loader reads it (the dumper, not the reader, turns a raw ``\x85`` into a space)."""
    assume(_within_limits(data, 0, as_json))
    text = json.dumps(data) if as_json else _dump_yaml(data)
    try:
        expected = json.loads(text) if as_json else YAML(typ="safe", pure=True).load(text)
    except YAMLError:  # the dumper writes `{:*: null}`, which no YAML reader takes back
        with pytest.raises(SpecError):
            parse_text(text, "f", as_json=as_json)
        return
    assert _same(parse_text(text, "f", as_json=as_json).data, expected)


@FUZZ
@given(data=mutated_data(), as_json=st.booleans())
def test_mutated_specs(tmp_path_factory, data, as_json):
    text = json.dumps(data, indent=2) if as_json else _dump_yaml(data)
    _check_loader(_write(tmp_path_factory, ".json" if as_json else ".yaml", text))


@FUZZ
@given(case=mutated_text())
def test_mutated_spec_files(tmp_path_factory, case):
    suffix, text = case
    _check_loader(_write(tmp_path_factory, suffix, text))


@FUZZ
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".yaml", ".json"]))
@example(raw=b"\xff\xfe", suffix=".yaml")
@example(raw=b"version: 1\x00", suffix=".yaml")
def test_random_bytes(tmp_path_factory, raw, suffix):
    _check_loader(_write(tmp_path_factory, suffix, raw))


@FUZZ
@given(text=yaml_ish, suffix=st.sampled_from([".yaml", ".json"]))
@example(text="a: &x 1\nb: &x 2\nversion: 1\nadapters: {d: {}}\n", suffix=".yaml")
@example(text="x: !!int abc\n", suffix=".yaml")
@example(text="<<: {<<: {version: 1}, adapters: {d: {}}}\n", suffix=".yaml")
def test_random_yaml_like_text(tmp_path_factory, text, suffix):
    _check_loader(_write(tmp_path_factory, suffix, text))


@FEW
@given(
    case=st.one_of(
        mutated_text(),
        st.tuples(st.just(".yaml"), yaml_ish),
        st.tuples(st.just(".yaml"), mutated_data().map(_dump_yaml)),
    )
)
def test_validate_command(tmp_path_factory, case):
    suffix, text = case
    _check_cli(_write(tmp_path_factory, suffix, text))


def _within_limits(data: Any, depth: int, as_json: bool) -> bool:
    """Data the loader reads back: not too deep, no huge integer, no NaN in JSON."""
    if depth > MAX_DEPTH - 2:
        return False
    if isinstance(data, bool) or data is None:
        return True
    if isinstance(data, int):
        return len(str(data)) <= MAX_INT_DIGITS
    if isinstance(data, float):
        return math.isfinite(data) or not as_json  # json.dumps writes NaN, which JSON lacks
    if isinstance(data, list):
        return all(_within_limits(v, depth + 1, as_json) for v in data)
    if isinstance(data, dict):
        return all(_within_limits(v, depth + 1, as_json) for v in data.values())
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# --- bombs: refused quickly, in little memory ---------------------------------------------


def _bomb(width: int, depth: int) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\nversion: 1\nadapters: {default: {}}\n"


BOMBS = {
    "alias-bomb-wide": (_bomb(100, 6), "expands to more than 100000 values via aliases"),
    "alias-bomb-deep": (_bomb(2, 40), "expands to more than 100000 values via aliases"),
    "merge-key-bomb": (
        "a0: &a0 {x: 1}\n"
        + "".join(
            f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}], k{i}: 1}}\n"
            for i in range(1, 8)
        )
        + "version: 1\nadapters: {default: {}}\n",
        "expands to more than 100000 values via aliases",
    ),
    "deep-flow-lists": ("version: 1\nadapters: " + "[" * 50_000 + "]" * 50_000, "nested more"),
    "deep-flow-maps": ("version: 1\nadapters: " + "{a: " * 20_000 + "}" * 20_000, "nested more"),
    "deep-block-maps": (
        "version: 1\nadapters:\n" + "".join(" " * i + "a:\n" for i in range(1, 1000)),
        "nested more",
    ),
    "deep-json": ('{"version": 1, "adapters": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
    "many-values": (
        "version: 1\nadapters: {d: {modules_to_save: [" + ",".join(["x"] * 400_000) + "]}}\n",
        "a spec file holds at most",
    ),
    "huge-int": ("version: 1\nadapters: {d: {r: " + "9" * 500_000 + "}}\n", "the limit is 100"),
    "huge-hex": ("version: 1\nadapters: {d: {r: 0x" + "f" * 500_000 + "}}\n", "the limit is"),
    "huge-json-int": ('{"version": 1, "adapters": {"d": {"r": ' + "9" * 500_000 + "}}}", "limit"),
    "huge-float": ("version: 1\nadapters: {d: {lora_alpha: 1" + "0" * 500_000 + ".0}}\n", "finite"),
    "long-key": ("version: 1\nadapters: {d: {'" + "k" * 500_000 + "': 1}}\n", "at most 1024"),
}
MEMORY_CHECKED = {"alias-bomb-wide", "alias-bomb-deep", "merge-key-bomb", "deep-flow-maps"}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_quickly(tmp_path, name):
    text, expected = BOMBS[name]
    assert len(text.encode()) <= MAX_BYTES
    path = tmp_path / ("bomb.json" if "json" in name else "bomb.yaml")
    path.write_text(text, encoding="utf-8")
    start = time.process_time()
    lines = [str(i) for i in check_file_report(path).errors]
    # a guard against blow-ups (a bomb expanded would take minutes or hours), not a speed
    # target: the slowest (many-values) takes 2 to 5 s of CPU on 2 cores
    assert time.process_time() - start < 30.0
    assert len(lines) == 1 and expected in lines[0], lines
    assert len(lines[0]) < 400  # a 500 KB key or number is not repeated in the message
    if name in MEMORY_CHECKED:
        tracemalloc.start()
        try:
            check_file_report(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_the_bad_spec_corpus_passes_the_same_checks():
    for path in sorted(BAD_SPECS.iterdir()):
        if path.name != "expected.yaml":
            assert _check_loader(path), path.name
