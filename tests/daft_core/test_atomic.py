"""daft_core.atomic in-process: failures keep the old output, names are deterministic, live writers are safe.

Kills at each moment of a swap are tested in tests/reliability/test_outputs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daft_core.atomic import aside_path, atomic_dir, atomic_file, recover

ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_write_keeps_the_old_folder_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    assert tmp.name.startswith(".out.daft-new-") and tmp.parent == tmp_path
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_a_failing_file_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    with atomic_file(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError), atomic_file(path, "w") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]


def test_nested_writes_inside_a_temp_folder(tmp_path: Path) -> None:
    """A step writes its files with atomic_file inside atomic_dir's temp folder (no self-deadlock)."""
    with atomic_dir(tmp_path / "out") as tmp:
        with atomic_file(tmp / "model.pt") as f:
            f.write(b"w")
        with atomic_dir(tmp / "sub") as inner:
            (inner / "y").write_text("y")
        recover(tmp_path / "out")  # e.g. an up-front check in the same process
        assert tmp.is_dir(), "a live writer's temp folder was removed"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.pt", "sub"]


def test_the_aside_copy_is_put_back_when_the_output_is_missing(tmp_path: Path) -> None:
    aside = aside_path(tmp_path / "out")
    assert aside == tmp_path / ".out.daft-old"
    aside.mkdir()
    (aside / "a.txt").write_text("old")
    assert recover(tmp_path / "out") == aside
    assert (tmp_path / "out" / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_recover_never_touches_an_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("k")
    aside_path(tmp_path / "out").mkdir()
    assert recover(tmp_path / "out") is None
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "keep").read_text() == "k"


def test_another_process_does_not_remove_a_live_writers_temp(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom daft_core.atomic import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'a.txt').write_text('new')\n"
        "    while not Path(sys.argv[2]).exists(): time.sleep(0.02)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), str(go)], env=env)
    try:
        deadline = time.monotonic() + 30
        while not any(p.name.startswith(".out.daft-new-") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.02)
        recover(tmp_path / "out")
        assert any(p.name.startswith(".out.daft-new-") for p in tmp_path.iterdir())
        go.touch()
        assert writer.wait(timeout=30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["go", "out"]
