"""The pre-commit hook (.pre-commit-hooks.yaml), run by the real ``pre-commit`` on a
temporary git repository that uses this checkout as its hook repository.

Two ways, from cheap to faithful:

- ``language: system`` (overridden in the user's config): pre-commit picks the files with
  the hook's ``files``/``types_or`` and runs its ``entry`` with them, using the ``adaptc``
  of this virtualenv. A few seconds; shows what the hook selects and prints.
- the hook as shipped (``language: python``): pre-commit pip-installs this checkout into a
  fresh virtualenv, as a user's first ``pre-commit run`` does. About two minutes (torch is
  installed from the local CPU wheel, pinned through ``PIP_CONSTRAINT``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.conftest import ROOT

pytest.importorskip("pre_commit")
if shutil.which("git") is None or not (ROOT / ".git").exists():
    pytest.skip("needs git and a git checkout of adaptc", allow_module_level=True)

GOOD = "version: 1\nadapters:\n  default: {r: 8}\n"
BAD = "version: 1\nadapters:\n  default:\n    lora_alph: 8\n"
REUSED_ANCHOR = "version: 1\nadapters:\n  a: &x {r: 8}\n  b: &x {r: 4}\n"
WORKFLOW = "name: CI\non: [push]\njobs:\n  test:\n    runs-on: ubuntu-latest\n"
GIT = ["git", "-c", "user.name=adaptc tests", "-c", "user.email=t@example.com"]
GIT += ["-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [*GIT, *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=120
    )
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def hook_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """This checkout's working tree (tracked and new files) as a one-commit git repository:
    what a user's ``repo:``/``rev:`` points at once it is pushed."""
    repo = tmp_path_factory.mktemp("adaptc-hooks")
    files = _git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for name in filter(None, files.split("\0")):
        src = ROOT / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "snapshot")
    return repo, _git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment pre-commit runs with: its own store, torch pinned to the CPU wheel.
    The store (1.2 GB once the hook's virtualenv is built) is removed afterwards."""
    base = tmp_path_factory.mktemp("pre-commit-home")
    constraints = base / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRE_COMMIT", "GIT_"))}
    env.update(
        PRE_COMMIT_HOME=str(base / "store"),
        PIP_CONSTRAINT=str(constraints),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PRE_COMMIT_COLOR="never",
    )
    yield env
    shutil.rmtree(base / "store", ignore_errors=True)


def _user_repo(
    root: Path, hook_repo: tuple[Path, str], tree: dict[str, str], **hook: object
) -> Path:
    root.mkdir()
    for name, text in tree.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    repo, rev = hook_repo
    config = {"repos": [{"repo": str(repo), "rev": rev, "hooks": [{"id": "adaptc-validate"}]}]}
    config["repos"][0]["hooks"][0].update(hook)
    with (root / ".pre-commit-config.yaml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(config, fh)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    return root


def _pre_commit(repo: Path, env: dict[str, str], timeout: int) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "--all-files", "--color", "never"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _checked(output: str) -> list[str]:
    """The summary lines adaptc printed (one per batch of files pre-commit handed it)."""
    return [line for line in output.splitlines() if " checked: " in line]


USER_FILES = {
    "specs/good.yaml": GOOD,
    "specs/bad.yaml": BAD,
    "specs/nested/peft.json": '{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}',
    "configs/chat.adaptc.yaml": GOOD,
    "out/run1/adaptc_spec.yaml": GOOD,
    "configs/other.yaml": WORKFLOW,  # not a spec, and not matched
    ".github/workflows/ci.yml": WORKFLOW,
    "package.json": '{"name": "x", "version": "1.0.0"}',
    "specs/README.md": "# specs\n",
}


def test_default_files_are_the_specs_and_nothing_else(tmp_path, hook_repo, home):
    repo = _user_repo(tmp_path / "user", hook_repo, USER_FILES, language="system")
    code, out = _pre_commit(repo, home, timeout=120)
    assert code == 1, out
    assert re.search(r"^adaptc validate\.+Failed$", out, flags=re.M), out
    assert (
        "specs/bad.yaml:4:5: adapters.default.lora_alph: unknown field 'lora_alph'; "
        "did you mean 'lora_alpha'?" in out
    )
    # specs/ (YAML and JSON, nested), *.adaptc.yaml anywhere, adaptc_spec.yaml anywhere
    assert _checked(out) == ["5 files checked: 4 valid, 1 invalid (1 error)"], out
    for other in ("workflows", "package.json", "other.yaml", "README", ".pre-commit-config"):
        assert other not in out


def test_users_choose_the_files(tmp_path, hook_repo, home):
    files = {"adapters/a.yaml": GOOD, "adapters/b.json": '{"version": 1, "adapters": {"x": {}}}'}
    repo = _user_repo(
        tmp_path / "user",
        hook_repo,
        {**USER_FILES, **files},
        language="system",
        files=r"^adapters/.*\.(ya?ml|json)$",
    )
    code, out = _pre_commit(repo, home, timeout=120)
    assert code == 0, out
    assert re.search(r"^adaptc validate\.+Passed$", out, flags=re.M), out


def test_warnings_show_with_verbose(tmp_path, hook_repo, home):
    files = {"specs/anchors.yaml": REUSED_ANCHOR}
    repo = _user_repo(tmp_path / "user", hook_repo, files, language="system", verbose=True)
    code, out = _pre_commit(repo, home, timeout=120)
    assert code == 0, out
    assert (
        "specs/anchors.yaml:4:6: warning: yaml: duplicate anchor &x (first at line 3); "
        "aliases *x after this line refer to this one" in out
    )
    assert "ReusedAnchorWarning" not in out


def test_the_hook_as_shipped_installs_and_runs(tmp_path, hook_repo, home):
    """pre-commit's own virtualenv, ``pip install`` of this checkout, then the hook: the
    environment is built once (about two minutes here) and reused on the second run."""
    repo = _user_repo(tmp_path / "user", hook_repo, USER_FILES)
    code, out = _pre_commit(repo, home, timeout=900)
    assert code == 1, out
    assert "specs/bad.yaml:4:5: adapters.default.lora_alph: unknown field" in out
    (repo / "specs" / "bad.yaml").write_text(GOOD)
    code, out = _pre_commit(repo, home, timeout=300)
    assert (code, "Installing environment" in out) == (0, False), out
