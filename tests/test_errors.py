"""User mistakes reach the CLI as one line on stderr and exit status 2, and each is a VggnetError.

Every case is a mistake a user makes on the command line (a model name, a missing or corrupt file, a bad
option); the same error is then raised through the library function underneath, which must be a
:class:`vggnet.errors.VggnetError` (so the CLI needs to catch nothing else) and keep its built-in base (so
``except ValueError`` / ``except FileNotFoundError`` in callers keeps working).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vggnet
from vggnet.cli import main
from vggnet.errors import UsageError, VggnetError


@pytest.fixture
def plain_ckpt(tmp_path: Path) -> Path:
    """A classification checkpoint without preprocessing metadata (mean, std, image_size)."""
    model = vggnet.create_model("vgg11", num_classes=3, width=1 / 16, fc_width=16)
    return vggnet.save_checkpoint(model, tmp_path / "plain.safetensors", {"classes": ["a", "b", "c"]})


@pytest.fixture
def corrupt_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vggnet {argv[0]}: error: ") and "Traceback" not in err
    return lines[0]


def raises_vggnet_error(call: Callable[[], Any], builtin: type[BaseException], match: str) -> VggnetError:
    with pytest.raises(VggnetError, match=match) as info:
        call()
    assert isinstance(info.value, builtin), type(info.value).__mro__
    return info.value


def test_unknown_model_name(capsys):
    line = one_error_line(capsys, ["info", "no_such_model"])
    assert "unknown model 'no_such_model'" in line
    error = raises_vggnet_error(lambda: vggnet.VGGConfig(name="no_such_model"), ValueError, "unknown model")
    assert isinstance(error, UsageError)


def test_input_size_too_small(capsys):
    assert "at least 32 pixels" in one_error_line(capsys, ["models", "--input-size", "8"])
    assert "at least 32 pixels" in one_error_line(capsys, ["info", "vgg11", "--input-size", "8"])


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert "checkpoint not found" in one_error_line(capsys, ["eval", "--ckpt", str(missing)])
    raises_vggnet_error(lambda: vggnet.models.checkpoint_file(missing), FileNotFoundError, "checkpoint not found")
    raises_vggnet_error(lambda: vggnet.load_checkpoint(missing), FileNotFoundError, "not found")
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    assert "run folder without" in one_error_line(capsys, ["eval", "--ckpt", str(empty_run)])


def test_corrupt_safetensors(corrupt_ckpt, capsys):
    assert "not a readable safetensors file" in one_error_line(capsys, ["info", str(corrupt_ckpt)])
    assert "not a readable safetensors file" in one_error_line(capsys, ["eval", "--ckpt", str(corrupt_ckpt)])
    raises_vggnet_error(lambda: vggnet.load_checkpoint(corrupt_ckpt), ValueError, "safetensors")


def test_corrupt_torch_weights(tmp_path, capsys):
    bad = tmp_path / "vgg16.pth"
    bad.write_text("hello, not a torch file")
    line = one_error_line(capsys, ["features", "--weights", str(bad), "--out", str(tmp_path / "f.npz")])
    assert "neither a safetensors file nor a weights-only torch file" in line
    raises_vggnet_error(lambda: vggnet.create_model("vgg11", weights=bad), ValueError, "weights-only torch file")
    assert not (tmp_path / "f.npz").exists()


def test_checkpoint_without_preprocessing(plain_ckpt, capsys):
    assert "metadata lacks mean, std, image_size" in one_error_line(capsys, ["eval", "--ckpt", str(plain_ckpt)])
    model, extra = vggnet.load_checkpoint(plain_ckpt)
    raises_vggnet_error(lambda: vggnet.models.checkpoint_meta(plain_ckpt, model, extra), ValueError, "lacks")


def test_classifier_given_to_localize(plain_ckpt, tmp_path, capsys):
    from vggnet.localize.runs import load_localizer

    image = tmp_path / "x.png"
    image.write_bytes(b"")
    line = one_error_line(capsys, ["localize", "predict", "--ckpt", str(plain_ckpt), str(image),
                                   "--out", str(tmp_path / "boxes")])
    assert "not a box-regression checkpoint" in line
    raises_vggnet_error(lambda: load_localizer(plain_ckpt), ValueError, "box-regression")


def test_bad_protocol(plain_ckpt, capsys):
    from vggnet.evaluate import parse_protocol

    line = one_error_line(capsys, ["eval", "--ckpt", str(plain_ckpt), "--protocol", "sideways@1.0"])
    assert "unknown protocol kind 'sideways'" in line
    raises_vggnet_error(lambda: parse_protocol("dense@1,x"), ValueError, "is not a number")


def test_probe_on_a_file_that_is_not_npz(tmp_path, capsys):
    from vggnet.transfer import load_features

    notes = tmp_path / "notes.txt"
    notes.write_text("these are not features\n")
    assert "not a readable .npz features file" in one_error_line(capsys, ["probe", "--train", str(notes)])
    raises_vggnet_error(lambda: load_features(notes), ValueError, "not a readable .npz")
    missing = tmp_path / "none.npz"
    assert "features file not found" in one_error_line(capsys, ["probe", "--train", str(missing)])
    raises_vggnet_error(lambda: load_features(missing), FileNotFoundError, "features file not found")


def test_data_prepare_on_a_file_that_is_not_an_archive(tmp_path, capsys):
    from vggnet.data import prepare_archive

    fake = tmp_path / "photos.tar.gz"
    fake.write_text("not an archive")
    line = one_error_line(capsys, ["data", "prepare", str(fake), "--out", str(tmp_path / "out")])
    assert "not a readable tar archive" in line
    raises_vggnet_error(lambda: prepare_archive(fake, tmp_path / "out"), ValueError, "not a readable tar")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["photos.tar.gz"]


def test_data_prepare_with_a_damaged_marker(tmp_path, capsys):
    from vggnet.data import prepare_archive
    from vggnet.data.prepare import MARKER

    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("cat/1.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("{half a json")
    assert "unreadable" in one_error_line(capsys, ["data", "prepare", str(archive), "--out", str(out)])
    raises_vggnet_error(lambda: prepare_archive(archive, out), ValueError, "prepare again")


def test_data_folder_that_is_not_there(tmp_path, capsys):
    from vggnet.data import load_image_folder

    assert "no such path" in one_error_line(capsys, ["data", "info", str(tmp_path / "nowhere")])
    raises_vggnet_error(lambda: load_image_folder(tmp_path / "nowhere"), ValueError, "no such path")
    assert "no such folder" in one_error_line(capsys, ["reproduce", "--data", str(tmp_path / "nowhere"),
                                                       "--out", str(tmp_path / "study")])


def test_voc_folder_that_is_not_there(plain_ckpt, tmp_path, capsys):
    from vggnet.data.voc import load_voc_folder

    line = one_error_line(capsys, ["localize", "eval", "--ckpt", str(plain_ckpt), "--data", str(tmp_path / "voc")])
    assert "no such folder" in line
    raises_vggnet_error(lambda: load_voc_folder(tmp_path / "voc"), ValueError, "no such folder")


def test_bad_options(plain_ckpt, tmp_path, capsys):
    from vggnet.localize.train import LocalizeSettings

    assert "--topk must be at least 1" in one_error_line(capsys, ["explain", "--ckpt", str(plain_ckpt), "--topk",
                                                                  "0", "x.png"])
    assert "--batch-size must be at least 1" in one_error_line(capsys, ["eval", "--ckpt", str(plain_ckpt),
                                                                        "--batch-size", "0"])
    recipe = tmp_path / "boxes.yaml"
    recipe.write_text("epochs: ten\n")
    line = one_error_line(capsys, ["localize", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                   "--recipe", str(recipe)])
    assert "epochs: expected int, got 'ten'" in line
    raises_vggnet_error(lambda: LocalizeSettings.from_dict({"epochs": "ten"}), ValueError, "expected int")
