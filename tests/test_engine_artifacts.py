"""Run-folder outputs: accuracy counting, confusion matrix, metrics files, TensorBoard, plots, console line."""

import csv
import json
import sys
import time

import pytest
import torch
from PIL import Image

from vggnet.engine.artifacts import (
    RunLogger,
    confusion_matrix,
    format_epoch_line,
    plot_confusion,
    plot_curves,
    topk_correct,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rec(epoch, **kw):
    return {"epoch": epoch, "epochs": 4, "train_loss": 2.0 / epoch, "train_top1": 20.0 * epoch, "lr": 0.1 / epoch, **kw}


def epochs_in(path):
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- accuracy and confusion


def test_topk_counts_with_top1_wrong_but_top2_right():
    logits = torch.tensor([[0.1, 0.7, 0.2],   # target 2 is second: top-1 wrong, top-2 right
                           [0.9, 0.06, 0.04],  # target 0 is first
                           [0.5, 0.3, 0.2]])   # target 2 is last: only top-3 right
    targets = torch.tensor([2, 0, 2])
    assert topk_correct(logits, targets, ks=(1, 2, 3)) == {1: 1, 2: 2, 3: 3}
    assert topk_correct(logits, targets) == {1: 1, 5: 3}  # k=5 clipped to 3 classes


def test_topk_on_ten_classes():
    logits = torch.arange(10.0).repeat(4, 1)  # class 9 best, class 0 worst
    targets = torch.tensor([9, 5, 4, 0])  # ranks 1, 5, 6, 10
    assert topk_correct(logits, targets, ks=(1, 5)) == {1: 1, 5: 2}


def test_confusion_matrix_by_hand():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    targets = torch.tensor([0, 0, 1, 2, 1, 2])
    m = confusion_matrix(preds, targets, 3)
    assert m.dtype == torch.int64
    assert m.tolist() == [[1, 1, 0],   # true 0: once right, once called 1
                          [0, 1, 1],   # true 1: once right, once called 2
                          [0, 0, 2]]   # true 2: always right
    assert confusion_matrix(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 2).sum() == 0
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


# ---------------------------------------------------------------- RunLogger


def test_logger_writes_jsonl_and_csv(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(rec(1))
    logger.log(rec(2, val_top1=55.5, lr=torch.tensor(0.05)))  # later epochs may add keys; tensors become numbers
    logger.close()
    assert epochs_in(tmp_path / "metrics.jsonl") == [1, 2]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["lr"] == pytest.approx(0.05)
    rows = csv_rows(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["epoch", "epochs", "train_loss", "train_top1", "lr", "val_top1"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["val_top1"] == "" and float(rows[1]["val_top1"]) == 55.5
    assert [r["epoch"] for r in logger.records] == [1, 2]
    assert not (tmp_path / "tb").exists()


def test_logger_reload_continues_same_files(tmp_path):
    first = RunLogger(tmp_path, tensorboard=False)
    first.log(rec(1))
    first.log(rec(2))
    first.close()
    again = RunLogger(tmp_path, tensorboard=False)
    assert [r["epoch"] for r in again.records] == [1, 2]
    again.log(rec(3))
    again.close()
    assert epochs_in(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert [r["epoch"] for r in csv_rows(tmp_path / "metrics.csv")] == ["1", "2", "3"]


def test_logger_truncate_drops_later_epochs(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    for epoch in range(1, 5):
        logger.log(rec(epoch))
    logger.close()
    resumed = RunLogger(tmp_path, tensorboard=False)
    resumed.truncate(2)  # resume from epoch 2's checkpoint
    assert [r["epoch"] for r in resumed.records] == [1, 2]
    assert epochs_in(tmp_path / "metrics.jsonl") == [1, 2]
    assert [r["epoch"] for r in csv_rows(tmp_path / "metrics.csv")] == ["1", "2"]
    resumed.log(rec(3))
    resumed.close()
    assert epochs_in(tmp_path / "metrics.jsonl") == [1, 2, 3]


def test_logger_tolerates_half_written_last_line(tmp_path):
    good = "".join(json.dumps(rec(e)) + "\n" for e in (1, 2))
    (tmp_path / "metrics.jsonl").write_text(good + '{"epoch": 3, "train_lo')  # killed mid-write, no newline
    logger = RunLogger(tmp_path, tensorboard=False)
    assert [r["epoch"] for r in logger.records] == [1, 2]
    logger.log(rec(3))  # must not glue onto the broken line
    logger.close()
    assert epochs_in(tmp_path / "metrics.jsonl") == [1, 2, 3]


def test_logger_tensorboard_scalars_and_purge_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path)
    for epoch in (1, 2, 3):
        logger.log(rec(epoch))
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # TensorBoard reads event files in name order: <unix second>.<host>.<pid>.<writer counter>. A resume is a new
    # process seconds later; here it is the same process, where the counter (9 < 10 as text) can misorder
    # two files of the same second, so the resumed writer starts in the next second, as it would for real
    time.sleep(1.1)

    resumed = RunLogger(tmp_path)
    resumed.truncate(1)
    resumed.log(rec(2, train_loss=0.25))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "epoch" not in events.Tags()["scalars"] and "time" not in events.Tags()["scalars"]
    loss = events.Scalars("train_loss")
    assert [s.step for s in loss] == [1, 2]  # the old epochs 2 and 3 are purged, the redone 2 kept
    assert loss[-1].value == pytest.approx(0.25)


def test_logger_works_without_tensorboard_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    logger = RunLogger(tmp_path, tensorboard=True)
    logger.log(rec(1))
    logger.close()
    assert epochs_in(tmp_path / "metrics.jsonl") == [1]
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------- plots


def assert_png(path, min_width, min_height):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_width <= width <= 4000 and min_height <= height <= 4000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind
    return width, height


def test_plot_curves_png(tmp_path):
    import matplotlib.pyplot  # noqa: F401  (pyplot already imported elsewhere must not matter)

    records = [rec(e) for e in range(1, 5)]
    for r in records[1::2]:  # validation every other epoch only
        r.update(val_loss=r["train_loss"] * 1.1, val_top1=r["train_top1"] - 3)
    records[0]["lr"] = 0.0  # warm-up from zero on a log axis
    path = plot_curves(records, tmp_path / "sub" / "curves.png", title="vgg11 — demo")
    assert path == tmp_path / "sub" / "curves.png"
    width, height = assert_png(path, 600, 250)
    assert width > height  # two panels side by side
    assert_png(plot_curves([], tmp_path / "empty.png"), 300, 200)


def test_plot_confusion_png(tmp_path):
    classes = [f"class {i}" for i in range(10)]
    preds = torch.randint(0, 10, (500,))
    targets = torch.where(torch.rand(500) < 0.7, preds, torch.randint(0, 10, (500,)))
    matrix = confusion_matrix(preds, targets, 10)
    assert_png(plot_confusion(matrix, classes, tmp_path / "confusion.png", title="epoch 3"), 400, 400)
    assert_png(plot_confusion(matrix.numpy(), classes, tmp_path / "counts.png", normalize=False), 400, 400)
    many = [str(i) for i in range(100)]  # no cell text, no tick labels: must still draw
    assert_png(plot_confusion(torch.eye(100, dtype=torch.int64), many, tmp_path / "many.png"), 400, 400)
    with pytest.raises(ValueError):
        plot_confusion(matrix, classes[:9], tmp_path / "bad.png")


# ---------------------------------------------------------------- console line


def test_format_epoch_line_full():
    record = {"epoch": 3, "epochs": 30, "train_loss": 0.5123, "train_top1": 83.12, "val_loss": 0.43, "val_top1": 86.0,
              "val_top5": 99.1, "lr": 0.01, "img_per_s": 1234.4, "data_wait_frac": 0.031, "epoch_time": 12.34,
              "time": 1.7e9}
    assert format_epoch_line(record) == ("epoch 3/30  train loss 0.512 top1 83.1%  val loss 0.430 top1 86.0% "
                                         "top5 99.1%  lr 0.0100  1234 img/s  data 3%  12.3s")


def test_format_epoch_line_skips_absent_fields():
    assert format_epoch_line({"epoch": 1, "train_loss": 1.0}) == "epoch 1  train loss 1.000"
    assert format_epoch_line({"epoch": 2, "val_top1": 50.0, "val_loss": None}) == "epoch 2  val top1 50.0%"
    assert format_epoch_line({"lr": 1e-5}) == "lr 1.00e-05"
    assert format_epoch_line({}) == ""
