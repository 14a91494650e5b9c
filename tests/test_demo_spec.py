"""The demo's default spec ships in the package and is read through importlib.resources.

No model is needed here (unlike tests/test_demo.py): only the spec is looked up and loaded.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

import adaptc.demo
from adaptc.demo import run
from tests.conftest import EXAMPLES, ROOT

PACKAGE_DIR = Path(adaptc.demo.__file__).resolve().parent


def test_the_shipped_spec_is_the_example_spec():
    shipped = resources.files("adaptc.demo") / run.SPEC_NAME
    assert shipped.read_bytes() == (EXAMPLES / run.SPEC_NAME).read_bytes()


def test_the_default_spec_is_a_package_resource_not_the_repo_example():
    spec = run.default_spec()
    assert spec.is_file()
    with resources.as_file(spec) as path:
        assert path.resolve().parent == PACKAGE_DIR
        assert not path.resolve().is_relative_to(ROOT / "specs")
    assert run.parse_args([]).spec is None  # no path into the source tree as the default


def test_the_default_spec_is_looked_up_with_importlib_resources(tmp_path, monkeypatch):
    """A package whose resources live elsewhere (an installed wheel): its spec is used."""
    text = (EXAMPLES / run.SPEC_NAME).read_text(encoding="utf-8").replace("r: 8", "r: 5")
    (tmp_path / run.SPEC_NAME).write_text(text, encoding="utf-8")
    real = resources.files

    def files(package: str) -> object:
        return tmp_path if package == "adaptc.demo" else real(package)

    monkeypatch.setattr(run.resources, "files", files)
    spec, source = run.load_demo_spec(None)
    assert Path(source) == tmp_path / run.SPEC_NAME
    assert spec.adapter().r == 5
    assert spec.task_type == "SEQ_CLS"


def test_a_missing_shipped_spec_or_spec_path_is_a_failed_check(tmp_path, monkeypatch):
    with pytest.raises(run.CheckFailed, match="not found; pass --spec"):
        run.load_demo_spec(tmp_path / "nope.yaml")
    monkeypatch.setattr(run.resources, "files", lambda package: tmp_path)
    with pytest.raises(run.CheckFailed, match=r"shipped spec .* is missing"):
        run.load_demo_spec(None)


def test_the_shipped_spec_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert run.SPEC_NAME in config["tool"]["setuptools"]["package-data"]["adaptc.demo"]
