"""``adaptc validate``: exit codes, output formats, path expansion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from adaptc.cli import main
from tests.conftest import BAD_SPECS, EXAMPLES, ROOT

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


def test_many_files_at_once(capsys, tmp_path, write):
    # pre-commit hands the hook every staged spec in one command line
    paths = [str(write(f"specs/s{i:03}.yaml", GOOD)) for i in range(300)]
    paths.append(str(write("specs/zz-bad.yaml", BAD)))
    code, out, _ = run(capsys, "validate", *paths)
    assert code == 1
    assert out.splitlines()[-1] == "301 files checked: 300 valid, 1 invalid (1 error)"
    assert len(out.splitlines()) == 2


def test_a_file_that_is_not_a_spec_is_one_error(capsys, write):
    workflow = write(".github/workflows/ci.yml", "name: CI\non: [push]\njobs: {}\n")
    code, out, _ = run(capsys, "validate", str(workflow))
    assert code == 1
    assert out.splitlines() == [
        f"{workflow}:1:1: (root): not an adaptc spec: its top-level keys are 'name', 'on', "
        "'jobs'; a spec has 'version: 1' and 'adapters:'",
        "1 file checked: 0 valid, 1 invalid (1 error)",
    ]


REUSED_ANCHOR = "version: 1\nadapters:\n  a: &x {r: 8}\n  b: &x {r: 4}\n"
ANCHOR_MESSAGE = (
    "duplicate anchor &x (first at line 3); aliases *x after this line refer to this one"
)


def test_parser_warnings_in_each_format(capsys, write):
    spec = write("anchors.yaml", REUSED_ANCHOR)
    code, out, err = run(capsys, "validate", str(spec))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{spec}:4:6: warning: yaml: {ANCHOR_MESSAGE}",
        "1 file checked: 1 valid",
    ]
    code, out, _ = run(capsys, "validate", "--format", "github", str(spec))
    assert out.splitlines()[0] == (
        f"::warning file={spec},line=4,col=6,title=adaptc validate::yaml: {ANCHOR_MESSAGE}"
    )
    code, out, _ = run(capsys, "validate", "--format", "json", str(spec))
    (entry,) = json.loads(out)["files"]
    assert entry["valid"] is True
    assert entry["parser_warnings"] == [
        {"file": str(spec), "line": 4, "column": 6, "field": "yaml", "message": ANCHOR_MESSAGE}
    ]
    code, out, _ = run(capsys, "validate", "-q", str(spec))
    assert (code, out) == (0, "")


def test_parser_warnings_never_reach_stderr_as_library_noise(write):
    spec = write("anchors.yaml", REUSED_ANCHOR)
    proc = subprocess.run(
        [sys.executable, "-m", "adaptc", "validate", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert f"{spec}:4:6: warning: yaml: {ANCHOR_MESSAGE}" in proc.stdout.splitlines()


def test_github_annotations_stay_on_one_line(capsys, write):
    spec = write("odd.yaml", 'version: 1\nadapters:\n  d: {"a\\fb": 1}\n')
    code, out, _ = run(capsys, "validate", "--format", "github", str(spec))
    assert code == 1
    assert "::adapters.d.a\\x0cb: unknown field 'a\\x0cb' (expected" in out.splitlines()[0]
    assert len(out.splitlines()) == 2


# --- action.yml: the composite GitHub Action, its steps run here with stand-ins ------------

ACTION = YAML(typ="safe", pure=True).load((ROOT / "action.yml").read_text(encoding="utf-8"))
STEPS = {
    step.get("id") or step.get("name") or step.get("uses"): step for step in ACTION["runs"]["steps"]
}


def _run_step(name: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A `run:` step as GitHub runs a `shell: bash` step (script file, -eo pipefail)."""
    step = STEPS[name]
    assert step["shell"] == "bash"
    script = cwd / f"{name.replace(' ', '-')}.sh"
    script.write_text(step["run"])
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_action_is_composite_and_takes_its_inputs_through_the_environment():
    assert ACTION["runs"]["using"] == "composite"
    assert set(ACTION["inputs"]) == {"paths", "python-version", "adaptc-version"}
    assert ACTION["inputs"]["paths"]["default"] == "specs/"
    used = set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", (ROOT / "action.yml").read_text()))
    assert used == set(ACTION["inputs"])
    for step in ACTION["runs"]["steps"]:
        assert "${{" not in step.get("run", ""), "an input in a script is a shell injection"
    assert STEPS["actions/setup-python@v5"]["with"]["python-version"] == (
        "${{ inputs.python-version }}"
    )


@pytest.mark.parametrize(
    ("version", "requirement"),
    [
        ("", "{action_path}"),  # the adaptc of the action's own ref
        ("0.1.0", "adaptc==0.1.0"),
        ("git+https://github.com/OWNER/adaptc@v1", "git+https://github.com/OWNER/adaptc@v1"),
        ("adaptc>=0.1,<1", "adaptc>=0.1,<1"),
    ],
)
def test_action_installs_torch_from_the_cpu_index_then_adaptc(tmp_path, version, requirement):
    log = tmp_path / "python.log"
    fake = tmp_path / "bin" / "python"  # records its arguments; `-m venv DIR` makes DIR
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\necho "$*" >> "$LOG"\n'
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi\n'
    )
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "LOG": str(log),
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_ACTION_PATH": str(ROOT),
        "ADAPTC_VERSION": version,
    }
    proc = _run_step("install", env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    venv = tmp_path / "adaptc-validate-venv"
    pip = "-m pip install --quiet --disable-pip-version-check"
    assert log.read_text().splitlines() == [
        f"-m venv {venv}",
        f"{pip} torch --index-url https://download.pytorch.org/whl/cpu",
        f"{pip} {requirement.format(action_path=ROOT)}",
    ]
    assert (tmp_path / "output").read_text() == f"adaptc={venv}/bin/adaptc\n"


def test_action_validate_step_annotates_and_fails(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "good.yaml").write_text(GOOD)
    deep = tmp_path / "cfg" / "a" / "b" / "chat.adaptc.yaml"  # `**` is adaptc's, not bash's
    deep.parent.mkdir(parents=True)
    deep.write_text(BAD)
    env = {
        "ADAPTC": str(Path(sys.executable).parent / "adaptc"),
        "INPUT_PATHS": "specs/\ncfg/**/*.adaptc.yaml",
    }
    proc = _run_step("adaptc validate", env, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "::error file=cfg/a/b/chat.adaptc.yaml,line=4,col=5,title=adaptc validate::"
        "adapters.default.lora_alph: unknown field 'lora_alph'; did you mean 'lora_alpha'?",
        "2 files checked: 1 valid, 1 invalid (1 error)",
    ]
    deep.write_text(GOOD)
    assert _run_step("adaptc validate", env, tmp_path).returncode == 0


# --- .pre-commit-hooks.yaml: what the hook's default `files` takes (run: test_precommit.py) -

(HOOK,) = YAML(typ="safe", pure=True).load((ROOT / ".pre-commit-hooks.yaml").read_text())


@pytest.mark.parametrize(
    ("path", "taken"),
    [
        ("specs/llama.yaml", True),
        ("specs/team/a/opt.yml", True),
        ("specs/peft/adapter_config.json", True),
        ("configs/chat.adaptc.yaml", True),
        ("x.adaptc.json", True),
        ("out/run-3/adaptc_spec.yaml", True),
        ("adaptc_spec.yaml", True),
        ("specs/README.md", False),
        ("docs/specs/openapi.yaml", False),  # only specs/ at the root
        (".github/workflows/ci.yml", False),
        (".pre-commit-config.yaml", False),
        ("package.json", False),
        ("configs/chat.yaml", False),
        ("adaptc.yaml", False),
    ],
)
def test_hook_files_pattern(path, taken):
    assert HOOK["id"] == "adaptc-validate" and HOOK["entry"] == "adaptc validate --format text"
    assert bool(re.search(HOOK["files"], path)) is taken  # pre-commit searches the path


def test_the_local_hook_in_the_docs_matches_the_shipped_one():
    docs = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    local = docs.split("  - repo: local\n", 1)[1].split("```", 1)[0]
    (hook,) = YAML(typ="safe", pure=True).load(local)["hooks"]
    for key in ("id", "entry", "files", "types_or", "require_serial"):
        assert hook[key] == HOOK[key], key
