"""`vggnet data prepare` and `vggnet data info` through the real entry point."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggnet.cli import main


def make_folder(root: Path, classes=("cat", "dog", "fox"), n=5) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    return root


def test_prepare_extracts_counts_and_caches(tmp_path, capsys):
    make_folder(tmp_path / "src" / "train")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
    out = tmp_path / "out"
    assert main(["data", "prepare", str(archive), "--out", str(out), "--cache", "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert f"ImageFolder root: {out / 'train'}" in text and "3 classes, 15 images" in text
    with np.load(out / "train.npz") as cached:
        assert cached["images"].shape == (15, 32, 32, 3)
    assert main(["data", "prepare", str(archive), "--out", str(out)]) == 0  # idempotent
    assert "3 classes, 15 images" in capsys.readouterr().out


def test_info_prints_a_table_per_split(tmp_path, capsys):
    make_folder(tmp_path / "train", n=4)
    make_folder(tmp_path / "val", n=2)
    assert main(["data", "info", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path}: 3 classes, 18 images"
    assert lines[1].split() == ["class", "train", "val"]
    assert lines[2].split() == ["cat", "4", "2"] and lines[-1].split() == ["total", "12", "6"]


def test_info_on_a_plain_folder_and_errors(tmp_path, capsys):
    make_folder(tmp_path / "imgs", classes=("a", "b"), n=3)
    assert main(["data", "info", str(tmp_path / "imgs")]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["a", "3"]
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    assert "missing: no such path" in capsys.readouterr().err


def test_help_texts(capsys):
    for argv in (["data", "--help"], ["data", "prepare", "--help"], ["data", "info", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 200
