"""Archive extraction (safe, idempotent, atomic) and the decoded cache of tiny images."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.data import (
    DataError,
    decode_subset,
    decode_to_cache,
    download_builtin,
    load_image_folder,
    prepare_archive,
)
from vggnet.data import prepare as prepare_module


def make_folder(root: Path, classes=("cat", "dog", "fox"), n=5, size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def make_archive(tmp_path: Path, top: str = "train", name: str = "data.tar.gz") -> Path:
    src = make_folder(tmp_path / "src" / top)
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=top)
    return archive


def add_member(archive: Path, info: tarfile.TarInfo, payload: bytes = b"") -> None:
    with tarfile.open(archive, "w:gz") as tar:
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_extracts_and_returns_the_image_folder_root(tmp_path):
    root = prepare_archive(make_archive(tmp_path), tmp_path / "out")
    assert root == tmp_path / "out" / "train"
    train, val, classes = load_image_folder(root, val_fraction=0.2)
    assert classes == ["cat", "dog", "fox"] and len(train) + len(val) == 15
    assert leftovers(tmp_path) == []  # no temporary folder left behind
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_second_call_is_a_no_op(tmp_path, monkeypatch):
    archive = make_archive(tmp_path)
    root = prepare_archive(archive, tmp_path / "out")
    (root / "cat" / "0.png").unlink()  # would come back if the archive were extracted again

    def no_extraction(*args, **kwargs):
        raise AssertionError("the archive was opened again")

    monkeypatch.setattr(prepare_module.tarfile, "open", no_extraction)
    assert prepare_archive(archive, tmp_path / "out") == root
    assert not (root / "cat" / "0.png").exists()


def test_a_changed_archive_is_extracted_again(tmp_path):
    archive = make_archive(tmp_path)
    root = prepare_archive(archive, tmp_path / "out")
    (root / "cat" / "0.png").unlink()
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    assert prepare_archive(archive, tmp_path / "out") == root
    assert (root / "cat" / "0.png").exists() and leftovers(tmp_path) == []


def test_wrapper_folders_and_train_val_layouts(tmp_path):
    wrapped = tmp_path / "wrapped.tar.gz"
    make_folder(tmp_path / "w" / "cifar" / "train")
    make_folder(tmp_path / "w" / "cifar" / "val", n=2)
    with tarfile.open(wrapped, "w:gz") as tar:
        tar.add(tmp_path / "w" / "cifar", arcname="cifar")
    root = prepare_archive(wrapped, tmp_path / "out")
    assert root == tmp_path / "out" / "cifar"  # holds train/ and val/: load_image_folder uses them as given
    train, val, _ = load_image_folder(root)
    assert (len(train), len(val)) == (15, 6)


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_refuses_members_outside_the_target(tmp_path, member):
    archive = tmp_path / "bad.tar.gz"
    add_member(archive, tarfile.TarInfo(member), b"pwned")
    with pytest.raises(DataError, match="refusing to extract member"):
        prepare_archive(archive, tmp_path / "sub" / "out")
    assert not (tmp_path / "sub" / "out").exists() and not (tmp_path / "evil.txt").exists()
    assert leftovers(tmp_path / "sub") == []


def test_refuses_links_outside_the_target(tmp_path):
    archive = tmp_path / "link.tar.gz"
    link = tarfile.TarInfo("train/cat/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
    add_member(archive, link)
    with pytest.raises(DataError, match="links outside"):
        prepare_archive(archive, tmp_path / "out")


def test_refuses_to_overwrite_a_foreign_folder_and_non_archives(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not made by `vggnet data prepare`"):
        prepare_archive(make_archive(tmp_path), tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    (tmp_path / "junk.tar.gz").write_text("not a tar")
    with pytest.raises(DataError, match="not a readable tar archive"):
        prepare_archive(tmp_path / "junk.tar.gz", tmp_path / "out2")
    with pytest.raises(DataError, match="no such archive"):
        prepare_archive(tmp_path / "missing.tar.gz", tmp_path / "out3")


def test_decode_to_cache_writes_reuses_and_refreshes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    cache = tmp_path / "cache" / "imgs.npz"
    images, labels, classes = decode_to_cache(root, cache)
    assert images.shape == (15, 30, 40, 3) and images.dtype == np.uint8 and cache.is_file()
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and classes == ["cat", "dog", "fox"]
    assert np.array_equal(images[0], np.asarray(Image.open(root / "cat" / "0.png")))

    def no_decoding(path):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "read_image", no_decoding)
        again, _, _ = decode_to_cache(root, cache)
    assert np.array_equal(again, images)
    Image.new("RGB", (40, 30)).save(root / "dog" / "new.png")
    assert len(decode_to_cache(root, cache)[0]) == 16  # the folder changed: decoded again


def test_decode_resizes_skips_corrupt_files_and_needs_one_size(tmp_path):
    root = make_folder(tmp_path / "imgs")
    Image.new("RGB", (64, 64)).save(root / "fox" / "big.png")
    with pytest.raises(DataError, match="sizes"):
        decode_to_cache(root, tmp_path / "c.npz")
    (root / "cat" / "broken.jpg").write_text("not a jpeg")
    images, labels, _ = decode_to_cache(root, tmp_path / "c.npz", size=16)
    assert images.shape == (16, 16, 16, 3) and len(labels) == 16


def test_decode_subset_gives_tensors_of_one_split(tmp_path):
    train, val, _ = load_image_folder(make_folder(tmp_path / "imgs"), val_fraction=0.2)
    x, y = decode_subset(val, tmp_path / "val.npz", size=32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == val.targets
    x2, _ = decode_subset(train, tmp_path / "train.npz")
    assert x2.shape == (12, 3, 30, 40)
    assert torch.equal(x2[0], train[0][0])


def write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format torchvision reads: magic (uint8, ndim), big-endian dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_builtin_dataset_is_never_downloaded_by_default(tmp_path):
    with pytest.raises(DataError, match="download=True"):
        download_builtin("fashion_mnist", tmp_path)
    with pytest.raises(DataError, match="unknown built-in dataset"):
        download_builtin("imagenet", tmp_path)


def test_builtin_dataset_becomes_an_image_folder(tmp_path):
    raw = tmp_path / ".fashion_mnist-raw" / "FashionMNIST" / "raw"  # where torchvision keeps its files
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    root = download_builtin("fashion_mnist", tmp_path)  # found locally: nothing to download
    train, val, classes = load_image_folder(root)
    assert (len(train), len(val)) == (20, 10) and "T-shirt-top" in classes and len(classes) == 10
    assert train[0][0].shape == (3, 28, 28)
    assert download_builtin("fashion_mnist", tmp_path) == root  # built once
