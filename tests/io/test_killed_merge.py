"""A merge killed mid-write (SIGKILL: no ``finally`` runs) leaves no partial output and no
temp files: the janitor process of :func:`adaptc._io.staged_dir` removes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import adaptc
from adaptc.atomic import _JANITOR, staged_dir
from tests.compiler.models import tiny_hf
from tests.conftest import ROOT

# the merge, slowed after its first shard so the test can kill it mid-write
SLOW_MERGE = textwrap.dedent("""
    import sys, time
    import adaptc.io.merge_checkpoint as m
    from adaptc.cli import main
    real = m._merge_shard
    def slow(*args):
        n = real(*args)
        print("wrote a shard", flush=True)
        time.sleep(60)
        return n
    m._merge_shard = slow
    sys.exit(main(sys.argv[1:]))
""")


def _gone(paths, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(p.exists() for p in paths()):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_sigkill_mid_merge_leaves_nothing_half_written(tmp_path, existing):
    model = tiny_hf("opt").eval()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    spec = {"version": 1, "task_type": "CAUSAL_LM",
            "adapters": {"default": {"init": "random", "r": 2}}}  # fmt: skip
    adaptc.save_adapter(adaptc.compile(model, spec), tmp_path / "adapter")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("the previous merge")
    args = [str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(out), "--force"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, "merge", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "wrote a shard", proc.stderr.read()
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert partial and any(partial[0].iterdir())  # a staging dir with a shard in it
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, no cleanup code runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".out.")])
    expected = ["adapter", "base", "out"] if existing else ["adapter", "base"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_the_janitor_puts_back_an_output_being_replaced(tmp_path):
    """Killed between moving the old output aside and moving the new one in."""
    staging, old, out = tmp_path / ".out.x.partial", tmp_path / ".out.x.old", tmp_path / "out"
    staging.mkdir()
    (staging / "new.txt").write_text("half")
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    proc = subprocess.run(
        [sys.executable, "-c", _JANITOR, str(staging), str(old), str(out)],
        input=b"",
        timeout=60,
    )
    assert proc.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "previous"


def test_a_failed_block_leaves_nothing_and_success_appears_whole(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(out) as staging:
        (staging / "a").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(out) as staging:
        (staging / "a").write_text("x")
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    with pytest.raises(FileExistsError), staged_dir(out):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
