"""Long commands off a terminal (issue #28): whole progress lines with a count and the time left, never a carriage
return, and nothing extra from a short run.

The interval between lines is cut from 30 s to 0, so every update prints: the real CLI runs in a subprocess with
stderr on a pipe for ``vggnet eval`` and archive extraction + decoding; the other commands run in-process, where
pytest's captured stderr is not a terminal either.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vggnet
import vggnet.progress as vprogress
from vggnet.cli import main

# "desc: 8/40 img (20%) [00:00 elapsed, 00:01 left, 9.1img/s]" (vggnet.progress.LOG_FORMAT)
LINE = re.compile(r"^(?P<desc>.+?): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\) "
                  r"\[[\d:]+ elapsed, (?P<left>[\d:?]+) left, .*\]$")
LOGGED = ("import sys, vggnet.progress as p; p.LOG_INTERVAL_S = 0; from vggnet.cli import main; "
          "raise SystemExit(main(sys.argv[1:]))")


def run_logged(*args: str) -> tuple[int, str, str]:
    """The real ``vggnet`` entry point with stderr on a pipe and a progress line at every update. Bytes, not text:
    text mode would turn a carriage return into a newline and hide it."""
    done = subprocess.run([sys.executable, "-c", LOGGED, *args], capture_output=True, timeout=600)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def progress_lines(err: str, desc: str) -> list[tuple[int, int, str]]:
    """(done, total, unit) of each whole progress line of ``desc``, each of which must say the time left."""
    found = []
    for line in err.split("\n"):
        match = LINE.match(line)
        if match and match["desc"] == desc:
            assert match["left"], line
            found.append((int(match["n"]), int(match["total"]), match["unit"]))
    return found


def assert_counts_up_to(lines: list[tuple[int, int, str]], total: int, unit: str) -> None:
    """Lines all along the work, not only one at the end: counts that rise to ``total``."""
    counts = [n for n, _, _ in lines]
    assert len(set(counts)) >= 3, lines
    assert counts == sorted(counts) and counts[-1] == total, lines
    assert all(t == total and u == unit for _, t, u in lines), lines


@pytest.fixture
def quick_lines(monkeypatch):
    monkeypatch.setattr(vprogress, "LOG_INTERVAL_S", 0.0)


def digits_run(root: Path) -> Path:
    """A run folder as `vggnet eval` reads one: an untrained 10-class checkpoint beside a digits recipe."""
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11", width=0.125, fc_width=32, num_classes=10, head="gap")
    meta = {"classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    vggnet.save_checkpoint(model, root / "best.safetensors", meta)
    recipe = {"data": {"dataset": "digits", "image_size": 32, "val_fraction": 0.2, "split_seed": 0}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def make_folder(root: Path, classes=("cat", "dog", "fox"), n=4) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_eval_logs_each_protocol_with_time_left(tmp_path):
    run = digits_run(tmp_path / "run")
    code, out, err = run_logged("eval", "--ckpt", str(run), "--limit", "40", "--batch-size", "8", "--device", "cpu",
                                "--protocol", "single", "--protocol", "dense@1,1.25")
    assert code == 0, err
    assert "\r" not in err
    assert_counts_up_to(progress_lines(err, "single@1"), 40, "img")
    assert_counts_up_to(progress_lines(err, "dense@1,1.25"), 40, "img")
    assert "| single@1 |" in out and "| dense@1,1.25 |" in out  # the table is still on stdout alone
    assert not LINE.match(out.splitlines()[0])


def test_no_progress_silences_eval(tmp_path):
    run = digits_run(tmp_path / "run")
    code, _, err = run_logged("eval", "--ckpt", str(run), "--limit", "16", "--batch-size", "8", "--device", "cpu",
                              "--no-progress")
    assert code == 0, err
    assert " left, " not in err


def test_data_prepare_logs_extraction_and_decoding(tmp_path):
    make_folder(tmp_path / "src" / "train")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
    code, out, err = run_logged("data", "prepare", str(archive), "--out", str(tmp_path / "out"), "--cache",
                                "--size", "16")
    assert code == 0, err
    assert "\r" not in err
    members = 1 + 3 + 12  # train/, the class folders, the images
    assert_counts_up_to(progress_lines(err, "extracting tiny.tar.gz"), members, "file")
    assert_counts_up_to(progress_lines(err, "decoding train.npz"), 12, "img")
    assert "3 classes, 12 images" in out


def test_training_decode_reports_unless_false(tmp_path, monkeypatch, quick_lines):
    """What a CIFAR-10 training run decodes first (engine/inputs.py calls decode_subset without a progress flag):
    lines by default, whatever the run's --progress; nothing with progress=False."""
    from vggnet.data import decode_subset, load_image_folder

    train, _, _ = load_image_folder(make_folder(tmp_path / "data"), val_fraction=0.0)
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    decode_subset(train, tmp_path / "cache" / "train.npz", size=16)
    assert "\r" not in err.getvalue()
    assert_counts_up_to(progress_lines(err.getvalue(), "decoding train.npz"), 12, "img")
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    decode_subset(train, tmp_path / "cache" / "again.npz", size=16, progress=False)
    assert quiet.getvalue() == ""


@pytest.fixture
def tiny_run(tmp_path):
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11", num_classes=3, width=0.125, head="gap")
    meta = {"classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    vggnet.save_checkpoint(model, tmp_path / "run" / "best.safetensors", meta)
    return tmp_path / "run"


@pytest.fixture
def pictures(tmp_path):
    return make_folder(tmp_path / "pictures", classes=("x", "y"), n=3)  # 6 images


def test_predict_logs_off_a_terminal_by_default(tiny_run, pictures, capsys, quick_lines):
    assert main(["predict", "--ckpt", str(tiny_run), "--batch-size", "2", str(pictures)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert_counts_up_to(progress_lines(err, "predict"), 6, "img")


def test_explain_logs_off_a_terminal_by_default(tiny_run, pictures, tmp_path, capsys, quick_lines):
    assert main(["explain", "--ckpt", str(tiny_run), str(pictures), "--out", str(tmp_path / "maps")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err
    assert_counts_up_to(progress_lines(err, "explain"), 6, "img")
    assert len(out.splitlines()) == 6 and not any(LINE.match(line) for line in out.splitlines())


def test_short_runs_print_no_progress_at_the_real_interval(tiny_run, pictures, tmp_path, capsys):
    """The first line comes once the work has run LOG_INTERVAL_S (30 s): a quick command says nothing extra."""
    assert main(["predict", "--ckpt", str(tiny_run), "--batch-size", "2", str(pictures)]) == 0
    assert main(["explain", "--ckpt", str(tiny_run), str(pictures), "--out", str(tmp_path / "maps")]) == 0
    assert " left, " not in capsys.readouterr().err


def test_int8_check_logs_both_passes(quick_lines, monkeypatch):
    from vggnet.export.common import check_agreement

    torch.manual_seed(0)
    model = vggnet.create_model("vgg11", num_classes=3, width=0.125, head="gap").eval()
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    images = torch.randn(40, 3, 32, 32)
    _, agreement = check_agreement(model, model, images, 0.98, batches=(1, 3, 8), what="onnx-int8 export")
    assert agreement == 1.0 and "\r" not in err.getvalue()
    assert_counts_up_to(progress_lines(err.getvalue(), "onnx-int8 export check: eager fp32"), 40, "img")
    assert_counts_up_to(progress_lines(err.getvalue(), "onnx-int8 export check: onnx-int8"), 40, "img")
