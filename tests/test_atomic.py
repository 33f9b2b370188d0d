"""vggnet.atomic: a writer killed between its temporary write and the rename leaves the old file intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vggnet import atomic

# The child writes through the named writer; os.replace is wrapped so that, once the temporary is complete (written
# and fsynced) and the rename is about to happen, it says so and waits to be killed.
CHILD = textwrap.dedent("""
    import os, sys, time
    target = sys.argv[1]
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.abspath(dst) == os.path.abspath(target):
            print("temp-written", os.path.getsize(src), flush=True)
            time.sleep(120)
        return real_replace(src, dst, *a, **k)
    os.replace = replace
    exec(sys.argv[2])
""")

WRITERS = {
    "write_json": "from vggnet.atomic import write_json; write_json(target, {'new': list(range(1000))})",
    "atomic_path": ("from vggnet.atomic import atomic_path\n"
                    "with atomic_path(target) as tmp:\n    tmp.write_bytes(b'new' * 1000)"),
    "save_checkpoint": ("import vggnet\n"
                        "m = vggnet.create_model('vgg11', num_classes=3, width=1/16, fc_width=16)\n"
                        "vggnet.save_checkpoint(m, target, {'classes': ['a', 'b', 'c']})"),
    "save_figure": ("from matplotlib.figure import Figure\nfrom vggnet.plots import save_figure\n"
                    "fig = Figure(); fig.add_subplot().plot([1, 2, 3]); save_figure(fig, target)"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writer_killed_before_rename_leaves_old_file(tmp_path: Path, writer: str) -> None:
    target = tmp_path / "result.bin"
    target.write_bytes(b"old content")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target), WRITERS[writer]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("temp-written"), proc.stderr.read()
        assert int(line.split()[1]) > len(b"old content")  # the new content was written in full to the temporary
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == b"old content"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(name.startswith(".result.bin.") for name in leftovers)  # hidden, never the target name


def test_error_inside_block_removes_temporary(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_mode_follows_umask_not_mkstemp(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_dir_replaces_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "epoch-0001"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("half a folder")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001"]


def test_fsync_called_on_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    atomic.write_text(tmp_path / "x.txt", "x")
    assert len(synced) >= 2  # the temporary file, then the folder holding the rename


def test_big_tree_is_flushed_by_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"sync": 0, "fsync": 0}
    real_fsync = os.fsync
    monkeypatch.setattr(os, "sync", lambda: calls.__setitem__("sync", calls["sync"] + 1))
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.__setitem__("fsync", calls["fsync"] + 1), real_fsync(fd))[1])
    with atomic.atomic_dir(tmp_path / "big") as tmp:
        for i in range(atomic.FSYNC_EACH_MAX + 1):
            (tmp / f"{i}.txt").write_text("x")
    assert calls["sync"] == 1 and calls["fsync"] <= 2  # one sync for the files; the parent folder's rename fsync
    with atomic.atomic_dir(tmp_path / "small") as tmp:
        (tmp / "a.txt").write_text("x")
    assert calls["sync"] == 1 and calls["fsync"] >= 3  # a small tree: each file and folder
