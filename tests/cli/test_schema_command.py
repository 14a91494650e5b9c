"""``adaptc schema``: print, write atomically, check staleness, markdown reference."""

from __future__ import annotations

from adaptc.cli import main
from adaptc.spec.docs import field_reference
from adaptc.spec.schema import json_schema_text


def test_out_writes_the_schema(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert out.read_text() == json_schema_text()
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]  # no temp file left


def test_check_detects_stale_and_fresh(tmp_path, capsys):
    stale = tmp_path / "schema.json"
    stale.write_text("{}")
    assert main(["schema", "--check", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err
    stale.write_text(json_schema_text())
    assert main(["schema", "--check", str(stale)]) == 0


def test_markdown_reference(capsys):
    assert main(["schema", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == field_reference()


def test_out_to_missing_directory_fails_cleanly(tmp_path, capsys):
    assert main(["schema", "--out", str(tmp_path / "no" / "such.json")]) == 1
    assert capsys.readouterr().err.startswith("adaptc schema: error: cannot write")


def test_markdown_out_splices_between_markers(tmp_path, capsys):
    from adaptc.spec.docs import BEGIN_MARKER, END_MARKER

    doc = tmp_path / "spec.md"
    doc.write_text(f"# Title\n\n{BEGIN_MARKER}\nSTALE-TEXT\n{END_MARKER}\n\n## After\n")
    assert main(["schema", "--format", "markdown", "--check", str(doc)]) == 1
    assert main(["schema", "--format", "markdown", "--out", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Title\n") and text.endswith("## After\n")
    assert field_reference() in text and "STALE-TEXT" not in text
    assert main(["schema", "--format", "markdown", "--check", str(doc)]) == 0
    doc.write_text("no markers")
    assert main(["schema", "--format", "markdown", "--out", str(doc)]) == 1
    assert "has no field-reference markers" in capsys.readouterr().err
