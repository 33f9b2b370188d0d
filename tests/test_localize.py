"""Box regression (Appendix A): box encoding, IoU, the merge rule, views, the box head, and a tiny run end to end."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet
from vggnet.cli import main
from vggnet.data.voc import (
    VOCAnnotation,
    VOCObject,
    class_names,
    load_voc_folder,
    read_pixels,
    split_annotations,
    write_voc,
)
from vggnet.localize.boxes import decode, encode, from_view, iou_hits, merge_boxes, to_view
from vggnet.localize.evaluate import Views, baselines, predict_boxes, view_batch
from vggnet.localize.model import BoxSpec, build_box_model, freeze_features, select_codes
from vggnet.localize.runs import evaluate_run, load_localizer, predict_files
from vggnet.localize.train import LocalizeSettings, box_loss, train_localizer


def test_encode_decode_round_trip_and_hand_values():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    codes = encode(boxes, (100, 200))  # H = 100, W = 200
    assert torch.allclose(codes[0], torch.tensor([30 / 200, 40 / 100, 40 / 200, 40 / 100]))
    assert torch.allclose(codes[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.allclose(decode(codes, (100, 200)), boxes)


def test_decode_floors_negative_sizes_and_clips():
    codes = torch.tensor([[0.5, 0.5, -0.2, 0.4], [0.9, 0.5, 0.4, 0.4]])
    out = decode(codes, (10, 10))
    assert out[0, 2] - out[0, 0] == 0  # negative width → empty, not inverted
    assert out[1].tolist() == pytest.approx([7.0, 3.0, 10.0, 7.0])  # 7 .. 11 clipped to the view
    assert decode(codes[1:], (10, 10), clip=False)[0, 2].item() == pytest.approx(11.0)


def test_iou_on_hand_made_boxes():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    truths = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]),  # identical: 1
              torch.tensor([[5.0, 0.0, 15.0, 10.0]]),  # half overlap: 50 / 150
              torch.tensor([[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 5.0]])]  # the better of two: 0.5
    best, hit = iou_hits(pred, truths)
    assert best.tolist() == pytest.approx([1.0, 1 / 3, 0.5])
    assert hit.tolist() == [True, False, True]


def test_merge_prefers_the_heaviest_cluster_over_the_single_best_box():
    agree = torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [10.0, 12.0, 50.0, 52.0]])
    outlier = torch.tensor([[60.0, 60.0, 90.0, 90.0]])
    boxes = torch.cat([agree, outlier])
    scores = torch.tensor([0.4, 0.4, 0.4, 0.9])  # the outlier is the single most confident window
    merged, share = merge_boxes(boxes, scores)
    assert merged.tolist() == pytest.approx([32 / 3 + 0.0, 32 / 3, 152 / 3, 152 / 3], abs=1e-4)
    assert share == pytest.approx(1.2 / 2.1, rel=1e-4)
    merged, _ = merge_boxes(boxes, torch.tensor([0.1, 0.1, 0.1, 0.9]))  # 0.3 < 0.9: the outlier wins
    assert merged.tolist() == pytest.approx(outlier[0].tolist())
    weighted, _ = merge_boxes(agree[:2], torch.tensor([3.0, 1.0]))  # score-weighted mean inside the cluster
    assert weighted[0].item() == pytest.approx(10.5)
    with pytest.raises(ValueError):
        merge_boxes(torch.zeros(0, 4), torch.zeros(0))


def test_views_map_boxes_back_to_the_image():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    views = Views(50, [0.5] * 3, [0.25] * 3, scales=(1.0, 2.0), stride=0.5)
    x, places = view_batch(image, "centre", views)
    assert x.shape == (1, 3, 50, 50)
    (offset, scale), = places
    assert offset == (25.0, 0.0) and scale == pytest.approx((0.5, 0.5))  # 200×100 → 100×50, crop x 25..75
    whole = torch.tensor([0.0, 0.0, 50.0, 50.0])
    assert from_view(whole, offset, scale).tolist() == pytest.approx([50.0, 0.0, 150.0, 100.0])
    box = torch.tensor([30.0, 10.0, 90.0, 70.0])
    assert torch.allclose(from_view(to_view(box, offset, scale), offset, scale), box)
    x, places = view_batch(image, "dense", views)
    # warped to (q·S)²: scale 1 → one 50×50 window (the whole view); scale 2 → 100×100, offsets 0, 25, 50 → 3 × 3
    assert len(places) == len(x) == 1 + 9
    assert places[0] == ((0.0, 0.0), (0.25, 0.5)) and places[-1] == ((50.0, 50.0), (0.5, 1.0))
    x, places = view_batch(image, "whole", views)
    assert places == [((0.0, 0.0), (0.25, 0.5))]
    with pytest.raises(ValueError, match="unknown protocol"):
        view_batch(image, "sliding", views)


def test_pcr_selects_the_class_box_and_scr_needs_no_class():
    out = torch.arange(2 * 12, dtype=torch.float32).view(2, 12)
    pcr = BoxSpec(("a", "b", "c"), per_class=True)
    assert pcr.outputs == 12 and BoxSpec(("a", "b", "c")).outputs == 4
    assert select_codes(out, pcr, torch.tensor([2, 0])).tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert select_codes(out[:, :4], BoxSpec(("a",)), None).shape == (2, 4)
    with pytest.raises(ValueError, match="class"):
        select_codes(out, pcr, None)


def test_box_loss_is_the_euclidean_loss_per_image():
    pred, target = torch.zeros(2, 4), torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0]])
    assert box_loss(pred, target, "l2").item() == pytest.approx(1.5)  # (1 + 2) / 2 images
    assert box_loss(pred, target, "smooth_l1").item() < 1.5


def test_box_model_starts_from_a_classification_checkpoint(tmp_path):
    cls = vggnet.create_model("vgg11_bn", num_classes=5, width=0.125, fc_width=32)
    vggnet.save_checkpoint(cls, tmp_path / "run" / "best.safetensors",
                           {"classes": list("abcde"), "mean": [0.4] * 3, "std": [0.2] * 3, "image_size": 32})
    model, info = build_box_model("vgg16", BoxSpec(("x", "y"), per_class=True), weights=tmp_path / "run")
    assert model.config.name == "vgg11_bn" and model.config.fc_width == 32  # the file's architecture wins
    assert model.get_classifier().out_features == 8
    assert info["mean"] == [0.4] * 3
    for key, value in cls.state_dict().items():
        if not key.startswith("head.fc8"):
            assert torch.equal(value, model.state_dict()[key]), key
    before = {k: v.detach().clone() for k, v in model.features.named_parameters()}
    frozen = freeze_features(model)
    assert frozen and all(not p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.features.parameters())
    assert all(torch.equal(v, dict(model.features.named_parameters())[k]) for k, v in before.items())


def make_voc(root, n=12, size=(64, 48), seed=0):
    """A bright rectangle on noise; its box is the annotation. One image has two objects, one a difficult one."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    w, h = size
    for i in range(n):
        pixels = (rng.random((h, w, 3)) * 60).astype("uint8")
        bw, bh = int(rng.integers(16, 40)), int(rng.integers(14, 30))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        pixels[y0:y0 + bh, x0:x0 + bw] = 230
        name = f"img-{i}.jpg"
        Image.fromarray(pixels).save(root / "images" / name, quality=95)
        objects = [VOCObject("blob", (float(x0), float(y0), float(x0 + bw), float(y0 + bh)))]
        if i == 0:
            objects.append(VOCObject("blob", (0.0, 0.0, 4.0, 4.0), difficult=True))
        write_voc(VOCAnnotation(root / "images" / name, w, h, tuple(objects)), root / "annotations" / f"img-{i}.xml")
    return root


def test_train_eval_predict_end_to_end(tmp_path):
    data = make_voc(tmp_path / "voc")
    annotations, skipped = load_voc_folder(data)
    assert not skipped and len(annotations) == 12
    train, val = split_annotations(annotations, 4, 0)
    settings = LocalizeSettings(model="vgg11", width=0.125, fc_width=32, image_size=32, epochs=2, batch_size=4,
                                val=4, scales=[1.0, 1.5])
    lines = []
    ckpt = train_localizer(settings, train, ["blob"], tmp_path / "run", val, log=lines.append)
    assert ckpt.is_file() and len(lines) == 2 and "val_acc_iou50" in lines[-1]
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in history)
    model, spec, views, meta = load_localizer(tmp_path / "run")
    assert spec == BoxSpec(("blob",)) and views.size == 32 and meta["split"] == {"val": 4, "seed": 0}
    report = evaluate_run(tmp_path / "run", annotations, ["whole", "centre", "dense"])
    assert report["images"] == 4
    assert set(report["rows"]) == {"SCR, whole", "SCR, centre", "SCR, dense", "mean box", "centred mean-size box",
                                   "whole image"}
    for row in report["rows"].values():
        assert 0 <= row["acc_iou50"] <= 1 and 0 <= row["mean_iou"] <= 1
    box, per_view = predict_boxes(model, read_pixels(annotations[0]), spec, views, "dense")
    assert per_view.shape[1] == 4 and len(per_view) > 1
    assert 0 <= box[0] <= box[2] <= 64 and 0 <= box[1] <= box[3] <= 48
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    written, failed = predict_files(tmp_path / "run", [str(data / "images" / "img-1.jpg"), str(tmp_path / "bad.jpg")],
                                    tmp_path / "out", "dense", data / "annotations", log=lines.append)
    assert failed == 1 and "bad.jpg" in lines[-1]
    assert [p.name for p in written] == ["img-1.boxes.png"]
    with Image.open(written[0]) as im:
        assert im.size == (64, 48)
        assert (230, 40, 40) in {im.getpixel((x, y)) for x in range(64) for y in range(48)}  # the red box is drawn


def test_baselines_on_hand_made_boxes():
    train = [torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([[50.0, 50.0, 100.0, 100.0]])]
    sizes = [(100, 100), (100, 100)]
    rows = baselines([t[0] for t in train], sizes, [torch.tensor([[25.0, 25.0, 75.0, 75.0]])], [(100, 100)])
    assert rows["mean box"]["acc_iou50"] == 1.0  # the mean of the two is the centred 50×50 box
    assert rows["centred mean-size box"]["mean_iou"] == pytest.approx(1.0)
    assert rows["whole image"]["mean_iou"] == pytest.approx(0.25)


def test_cli_train_eval_predict_and_bad_input(tmp_path, capsys):
    data = make_voc(tmp_path / "voc", n=8)
    run = tmp_path / "run"
    base = ["localize", "train", "--data", str(data), "--out", str(run), "--model", "vgg11", "--width", "0.125",
            "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--val", "2"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("fc_width: 32\nscales: [1.0]\n")
    assert main([*base, "--recipe", str(recipe)]) == 0
    assert main([*base, "--recipe", str(recipe)]) == 2  # the run folder exists
    assert "exists" in capsys.readouterr().err
    recipe.write_text("fc_widht: 32\n")
    assert main([*base, "--force", "--recipe", str(recipe)]) == 2
    assert "unknown localize setting" in capsys.readouterr().err and (run / "best.safetensors").is_file()
    assert main(["localize", "eval", "--ckpt", str(run), "--data", str(data), "--protocol", "whole"]) == 0
    out = capsys.readouterr().out
    assert "| SCR, whole |" in out and "| whole image |" in out
    cls = vggnet.save_checkpoint(vggnet.create_model("vgg11", num_classes=2, width=0.125), tmp_path / "c.safetensors",
                                 {"mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 32})
    assert main(["localize", "eval", "--ckpt", str(cls), "--data", str(data)]) == 2
    assert "not a box-regression checkpoint" in capsys.readouterr().err
    assert main(["localize", "predict", "--ckpt", str(run), str(data / "images" / "img-2.jpg"),
                 "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "img-2.boxes.png").is_file()


def test_data_prepare_recognises_a_voc_box_set(tmp_path, capsys):
    import tarfile

    data = make_voc(tmp_path / "voc", n=3)
    archive = tmp_path / "voc.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(data, arcname="voc")
    assert main(["data", "prepare", str(archive), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "VOC box set:" in out and "3 annotated images, 4 objects, classes ['blob'], 0 skipped" in out


def test_window_scores_distrust_boxes_cut_by_an_inner_window_edge():
    from vggnet.localize.evaluate import window_scores

    # a 200×100 image at scale 1 (S = 100): windows at x = 0 and x = 100
    places = [((0.0, 0.0), (1.0, 1.0)), ((100.0, 0.0), (1.0, 1.0))]
    raw = torch.tensor([[20.0, 10.0, 80.0, 90.0],     # well inside the first window: trusted
                        [0.0, 10.0, 60.0, 90.0]])     # stops at the second window's left edge, inside the image
    scores = window_scores(raw, places, 100, (100, 200))
    assert scores.tolist() == pytest.approx([1.0, 0.05])
    edge = window_scores(torch.tensor([[0.0, 0.0, 60.0, 100.0]]), places[:1], 100, (100, 200))
    assert edge.item() == pytest.approx(1.0)  # left and top on the image's own border: no cut
    outside = window_scores(torch.tensor([[50.0, 0.0, 150.0, 100.0]]), places[:1], 100, (100, 200))
    assert outside.item() == pytest.approx(0.5 * 0.05)  # half outside, and its clipped side sits on a cut


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    data = make_voc(tmp_path / "voc", n=6)
    annotations, _ = load_voc_folder(data)
    settings = LocalizeSettings(model="vgg11", width=0.125, fc_width=32, image_size=32, epochs=3, batch_size=3,
                                lr=1e12, dropout=0.0)
    with pytest.raises(ValueError, match="lower lr"):
        train_localizer(settings, annotations, ["blob"], tmp_path / "run", log=lambda line: None)
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_box_model_from_a_torchvision_file(tmp_path):
    import torchvision

    tv = torchvision.models.vgg11(num_classes=7)
    path = tmp_path / "vgg11.pth"
    torch.save(tv.state_dict(), path)
    model, info = build_box_model("vgg16", BoxSpec(("x",)), weights=path)
    assert model.config.name == "vgg11" and model.get_classifier().out_features == 4
    assert info["format"] == "torchvision" and info["image_size"] == 224
    assert torch.equal(model.features.block1_conv1.weight, tv.features[0].weight)
    assert torch.equal(model.head.fc7.weight, tv.classifier[3].weight)


# --- a newcomer's messy set: XML in annots/, a truncated photo, boxes past the image --------------------------------

RACCOON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon-voc.tar.gz"


def photo_set(root: Path, n: int = 8, xml_dir: str = "annots") -> Path:
    """``n`` real photos with their VOC XML from the raccoon tarball when it is there (else synthetic JPEGs,
    as :func:`make_voc` draws them), the XML in ``root/<xml_dir>`` and the photos in ``root/images``."""
    if not RACCOON.is_file():
        make_voc(root, n=n)
        (root / "annotations").rename(root / xml_dir)
        return root
    (root / xml_dir).mkdir(parents=True)
    (root / "images").mkdir()
    stems = [f"raccoon-{i}" for i in range(1, n + 1)]
    wanted = {f"./annotations/{s}.xml": root / xml_dir / f"{s}.xml" for s in stems}
    wanted |= {f"./images/{s}.jpg": root / "images" / f"{s}.jpg" for s in stems}
    with tarfile.open(RACCOON) as tar:
        for member in tar:
            if member.name in wanted:
                wanted.pop(member.name).write_bytes(tar.extractfile(member).read())
            if not wanted:
                break
    assert not wanted, f"not in {RACCOON}: {sorted(wanted)}"
    return root


def truncate(path: Path, cut: int = 20) -> Path:
    path.write_bytes(path.read_bytes()[:-cut])
    return path


def push_boxes_outside(xml: Path) -> None:
    """The first box's xmax 30 px past the image, and a second object wholly to its right."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(xml)
    root = tree.getroot()
    width = int(root.findtext("size/width"))
    box = root.find("object/bndbox")
    box.find("xmax").text = str(width + 30)
    extra = ET.fromstring(f"<object><name>{root.findtext('object/name')}</name><difficult>0</difficult><bndbox>"
                          f"<xmin>{width + 5}</xmin><ymin>1</ymin><xmax>{width + 40}</xmax><ymax>9</ymax>"
                          "</bndbox></object>")
    root.append(extra)
    tree.write(xml)


def test_localize_on_a_messy_set_completes_and_names_the_bad_photo_once(tmp_path, capsys):
    data = photo_set(tmp_path / "set")
    images = sorted((data / "images").iterdir())
    bad, boxed = images[2], images[3]
    truncate(bad)
    push_boxes_outside(data / "annots" / f"{boxed.stem}.xml")
    run = tmp_path / "run"
    assert main(["localize", "train", "--data", str(data), "--out", str(run), "--model", "vgg11", "--width", "0.125",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--val", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count(bad.name) == 1 and "truncated" in err and err.count("skipped") == 1
    assert err.count(f"{boxed.stem}.xml") == 2  # one note for the clipped box, one for the dropped one
    assert "wholly outside" in err and "clipped to" in err
    assert main(["localize", "eval", "--ckpt", str(run), "--data", str(data), "--protocol", "all"]) == 0
    out, err = capsys.readouterr()
    assert err.count(bad.name) == 1 and err.count("skipped") == 1
    assert "| SCR, dense |" in out and "| whole image |" in out

    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(data, arcname="set")
    assert main(["data", "prepare", str(archive), "--out", str(tmp_path / "prepared")]) == 0
    out, err = capsys.readouterr()
    assert "VOC box set:" in out and "class folder" not in out + err
    assert f"{len(images) - 1} annotated images" in out and "1 skipped" in out and "2 box(es)" in out
    assert err.count(bad.name) == 1


def test_a_photo_that_breaks_after_loading_is_left_out_of_eval_with_one_line(tmp_path):
    data = photo_set(tmp_path / "set", n=6, xml_dir="annotations")
    annotations, skipped = load_voc_folder(data)
    assert not skipped
    settings = LocalizeSettings(model="vgg11", width=0.125, fc_width=32, image_size=32, epochs=1, batch_size=3,
                                val=2, scales=[1.0])
    train_localizer(settings, annotations, class_names(annotations), tmp_path / "run", log=lambda line: None)
    bad = truncate(annotations[1].image)  # after the folder was read: only the pixels can tell
    lines: list[str] = []
    report = evaluate_run(tmp_path / "run", annotations, ["whole", "dense"], split="all", log=lines.append)
    assert report["images"] == len(annotations) - 1
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0]


def test_an_xml_folder_of_another_name_is_an_error_listing_the_accepted_names(tmp_path, capsys):
    data = photo_set(tmp_path / "set", n=2, xml_dir="labels")
    assert main(["localize", "train", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "annotations/, annots/" in err and "labels/" in err and "rename" in err


def test_box_pictures_carry_a_legend():
    from vggnet.localize.draw import PRED, TRUE, draw_boxes

    pixels = torch.full((3, 150, 200), 128, dtype=torch.uint8)
    pred, truth = torch.tensor([60.0, 20.0, 180.0, 90.0]), torch.tensor([[70.0, 25.0, 190.0, 95.0]])

    def corner(image: Image.Image) -> set:  # the bottom-left quarter, away from both boxes
        return {image.getpixel((x, y)) for x in range(50) for y in range(110, 150)}

    both = corner(draw_boxes(pixels, pred, truth))
    assert PRED in both and TRUE in both and (0, 0, 0) in both  # a swatch per colour on a dark strip
    alone = corner(draw_boxes(pixels, pred))
    assert PRED in alone and TRUE not in alone  # no truth drawn, none named
    thumb = draw_boxes(torch.full((3, 48, 64), 128, dtype=torch.uint8), torch.tensor([30.0, 5.0, 60.0, 20.0]))
    assert (0, 0, 0) not in {thumb.getpixel((x, y)) for x in range(64) for y in range(48)}  # too small: no legend


def test_localize_logs_progress_and_time_left_off_a_terminal(tmp_path, capsys, monkeypatch):
    """Issue #28: off a terminal (pytest's stderr is not one), training ends each epoch with the run's time left and
    logs its batches, the folder read and the evaluation their images, every LOG_INTERVAL_S (cut to 0 here): whole
    lines, no carriage return."""
    import vggnet.progress as vprogress

    monkeypatch.setattr(vprogress, "LOG_INTERVAL_S", 0.0)
    data = make_voc(tmp_path / "voc", n=8)
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("fc_width: 32\nscales: [1.0]\n")
    assert main(["localize", "train", "--data", str(data), "--out", str(run), "--recipe", str(recipe), "--model",
                 "vgg11", "--width", "0.125", "--image-size", "32", "--epochs", "2", "--batch-size", "2",
                 "--val", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    reading = [line for line in lines if line.startswith(f"reading {data / 'annotations'}: ")]
    assert reading and reading[-1].startswith(f"reading {data / 'annotations'}: 8/8 image (100%)")
    epochs = [line for line in lines if line.startswith(("epoch 1 ", "epoch 2 "))]
    assert len(epochs) == 2 and epochs[0].endswith(" left") and "left" not in epochs[1]  # none after the last
    batches = [line for line in lines if line.startswith("epoch 1/2: ")]  # 6 training images, 2 a batch
    assert len(batches) >= 3 and batches[-1].startswith("epoch 1/2: 3/3 batch (100%)")
    assert all(" left, " in line for line in batches + reading)
    assert main(["localize", "eval", "--ckpt", str(run), "--data", str(data), "--protocol", "whole"]) == 0
    out, err = capsys.readouterr()
    scored = [line for line in err.splitlines() if line.startswith("whole: ")]
    assert "\r" not in err and len(scored) >= 2 and scored[-1].startswith("whole: 2/2 img (100%)")
    assert all(" left, " in line for line in scored) and "| SCR, whole |" in out
