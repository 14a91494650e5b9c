"""``adaptc validate``: exit codes, output formats, path expansion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adaptc.cli import main
from tests.conftest import BAD_SPECS, EXAMPLES

GOOD = "version: 1\nadapters:\n  default: {r: 8}\n"
BAD = "version: 1\nadapters:\n  default:\n    lora_alph: 8\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_examples_directory_is_valid(capsys):
    code, out, _ = run(capsys, "validate", str(EXAMPLES.parent))
    assert code == 0
    assert out.strip().endswith("valid") and "invalid" not in out


def test_invalid_file_exits_1_with_located_error_and_summary(capsys, write):
    good, bad = write("good.yaml", GOOD), write("bad.yaml", BAD)
    code, out, _ = run(capsys, "validate", str(good), str(bad))
    assert code == 1
    assert out.splitlines() == [
        f"{bad}:4:5: adapters.default.lora_alph: unknown field 'lora_alph'; did you mean "
        "'lora_alpha'?",
        "2 files checked: 1 valid, 1 invalid (1 error)",
    ]


def test_quiet_prints_only_errors(capsys, write):
    code, out, _ = run(capsys, "validate", "-q", str(write("good.yaml", GOOD)))
    assert (code, out) == (0, "")


def test_directories_and_globs_expand(capsys, tmp_path, write):
    write("a/one.yaml", GOOD)
    write("a/b/two.yml", GOOD)
    write("a/b/three.json", json.dumps({"version": 1, "adapters": {"x": {}}}))
    write("a/notes.txt", "not a spec")
    write("a/.hidden/four.yaml", BAD)
    code, out, _ = run(capsys, "validate", str(tmp_path / "a"))
    assert (code, out.strip()) == (0, "3 files checked: 3 valid")
    code, out, _ = run(capsys, "validate", str(tmp_path / "a" / "**" / "*.y*ml"))
    assert (code, out.strip()) == (0, "2 files checked: 2 valid")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope.yaml"], "adaptc validate: error: no such file or directory: nope.yaml"),
        (["nothing/*.yaml"], "adaptc validate: error: no files match nothing/*.yaml"),
    ],
)
def test_usage_errors_exit_2(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "validate", *argv)
    assert (code, err.strip()) == (2, message)


def test_empty_directory_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "validate", str(tmp_path))
    assert code == 2 and "no spec files" in err


def test_no_paths_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2


def test_json_format(capsys, write):
    bad = write("bad.yaml", BAD)
    code, out, _ = run(capsys, "validate", "--format", "json", str(bad))
    assert code == 1
    payload = json.loads(out)
    assert payload["summary"] == {"files": 1, "invalid": 1, "errors": 1}
    (entry,) = payload["files"]
    assert entry["valid"] is False
    assert entry["errors"] == [
        {
            "file": str(bad),
            "line": 4,
            "column": 5,
            "field": "adapters.default.lora_alph",
            "message": "unknown field 'lora_alph'; did you mean 'lora_alpha'?",
        }
    ]


def test_github_format_annotations(capsys, write):
    bad = write("dir,with:odd/bad.yaml", BAD)
    code, out, _ = run(capsys, "validate", "--format", "github", str(bad))
    assert code == 1
    first = out.splitlines()[0]
    escaped = str(bad).replace(":", "%3A").replace(",", "%2C")
    assert first == (
        f"::error file={escaped},line=4,col=5,title=adaptc validate::adapters.default.lora_alph: "
        "unknown field 'lora_alph'; did you mean 'lora_alpha'?"
    )


def test_every_bad_spec_fails_and_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "adaptc", "validate", str(BAD_SPECS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert "0 valid" in summary


def test_console_script_is_installed():
    exe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import shutil,sys; print(shutil.which('adaptc', path=sys.argv[1]))",
            str(__import__("pathlib").Path(sys.executable).parent),
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("adaptc ")


def test_the_cli_and_the_spec_language_do_not_import_torch():
    code = (
        "import sys, adaptc, adaptc.cli; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]"  # `adaptc validate` starts fast in CI
