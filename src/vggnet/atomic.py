"""One atomic write for every file and folder vggnet produces (checkpoints, recipes, results, plots, exports).

A reader sees the old file or the new one, never half of either, and a power cut after the call returns keeps
the new one: the data goes to a temporary name in the same folder (same file system, so the rename is atomic),
is fsynced, renamed over the target, and the folder is fsynced so the rename itself is durable. On any error the
temporary is removed and the old file is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "file_sha256", "write_bytes", "write_json", "write_text"]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; a file system that cannot fsync a folder (some network mounts) is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# A tree with more files than this is flushed by one os.sync() instead of a fsync per file: extracting CIFAR-10
# (50,000 files) took ~90 s of one-by-one fsyncs here, the single sync a few seconds.
FSYNC_EACH_MAX = 256


def _fsync_tree(root: Path) -> None:
    walk = [(Path(dirpath), files) for dirpath, _, files in os.walk(root)]
    if sum(len(files) for _, files in walk) > FSYNC_EACH_MAX:
        os.sync()
        return
    for folder, files in walk:
        for name in files:
            _fsync_file(folder / name)
        _fsync_dir(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it with any library (``save_file``, ``savefig``, ...).

    When the block exits normally the temporary is fsynced and renamed over ``path`` (then the folder is fsynced);
    when it raises, the temporary is removed and ``path`` keeps its old content. ``suffix`` keeps the extension a
    writer may insist on (``np.savez`` appends ``.npz``; matplotlib picks the format by it). The file gets
    ``mode`` less the umask (``mkstemp``'s 0600 would make a shared results file private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole (an existing folder of
    that name is removed first), with every file in it fsynced. On error the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks: how a checkpoint is named in the registry and checked
    before it is served or retrained (a file that changed since is refused, not trusted)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
