"""PASCAL VOC boxes: the coordinate convention, round trips, the errors users hit, splits, and box-aware augmentation.

Everything is synthetic and written into tmp_path: a bright rectangle on a black PNG (lossless, so the pixels
are exact) is an object whose true box is known, and a transform is right when its box still encloses them.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from vggnet.data.folder import DataError
from vggnet.data.voc import (
    VOCAnnotation,
    VOCBoxes,
    VOCError,
    VOCObject,
    class_names,
    collate,
    eval_box_transform,
    load_voc_folder,
    primary_box,
    primary_boxes,
    primary_object,
    read_voc,
    split_annotations,
    train_box_transform,
    write_voc,
)


def voc_xml(filename="a.png", size=(64, 48), objects=(("cat", 11, 6, 30, 20, 0),), path="/Users/someone/a.png"):
    """Devkit-style XML; coordinates are 1-based inclusive as in real files (given as strings or numbers)."""
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for n, x0, y0, x1, y1, d in objects)
    return f"<annotation><folder>images</folder><filename>{filename}</filename><path>{path}</path>" \
           f"{size_xml}{objs}</annotation>"


def make_image(path: Path, size=(64, 48), rects=(((10, 5, 30, 20), (255, 255, 255)),), exif=None) -> Path:
    """Black image with filled rectangles, each given as an edge-coordinate box (x0, y0, x1, y1) and a colour."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for (x0, y0, x1, y1), colour in rects:
        pixels[y0:y1, x0:x1] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if exif is not None:
        tags = Image.Exif()
        tags[0x0112] = exif
        image.save(path, exif=tags)
    else:
        image.save(path)
    return path


def make_pair(root: Path, stem: str, xml: str | None = None, image: bool = True, **image_kwargs) -> Path:
    """root/annotations/<stem>.xml and root/images/<stem>.png, the layout load_voc_folder expects."""
    xml_path = root / "annotations" / f"{stem}.xml"
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    xml_path.write_text(xml if xml is not None else voc_xml(f"{stem}.png"))
    if image:
        make_image(root / "images" / f"{stem}.png", **image_kwargs)
    return xml_path


def bright_box(image: torch.Tensor, channel: int | None = None, threshold: float = 0.5) -> torch.Tensor:
    """Edge-coordinate box around the pixels above ``threshold`` (in one channel, or the mean of all)."""
    plane = image[channel] if channel is not None else image.mean(0)
    ys, xs = torch.nonzero(plane > threshold, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


# --------------------------------------------------------------------------------------------- reading


def test_coordinate_convention_is_one_based_inclusive_to_pixel_edges(tmp_path):
    make_image(tmp_path / "images" / "a.png")
    xml = tmp_path / "annotations" / "a.xml"
    xml.parent.mkdir()
    xml.write_text(voc_xml(objects=(("cat", 1, 1, 10, 5, 0), ("dog", 11, 6, 30, 20, 1))))
    ann = read_voc(xml)
    assert ann.width == 64 and ann.height == 48
    assert ann.objects[0] == VOCObject("cat", (0.0, 0.0, 10.0, 5.0), False)  # pixels 1..10 are 10 wide
    assert ann.objects[1] == VOCObject("dog", (10.0, 5.0, 30.0, 20.0), True)
    # the box matches the pixels make_image fills for the edge box (10, 5, 30, 20)
    assert ann.image == tmp_path / "images" / "a.png"  # <filename> beside the annotations, not <path>
    out = write_voc(ann, tmp_path / "out" / "a.xml").read_text()
    assert "<xmin>1</xmin>" in out and "<xmax>10</xmax>" in out and "<xmin>11</xmin>" in out


def test_round_trip_write_then_read_is_identity(tmp_path):
    image = make_image(tmp_path / "images" / "pic.png", size=(50, 40))
    ann = VOCAnnotation(image, 50, 40, (
        VOCObject("dog", (0.0, 0.0, 50.0, 40.0), False),      # the whole image: edges written as 1 and W
        VOCObject("cat", (3.0, 4.5, 20.25, 30.0), True),      # fractional, difficult
        VOCObject("cat", (10.0, 10.0, 11.0, 11.0), False),    # one pixel
    ))
    xml = write_voc(ann, tmp_path / "annotations" / "pic.xml")
    back = read_voc(xml)
    assert back == ann
    assert [o.difficult for o in back.objects] == [False, True, False]
    again = read_voc(write_voc(back, tmp_path / "annotations" / "pic2.xml"))  # read→write→read
    assert again == back
    assert not list(xml.parent.glob(".*"))  # the atomic write left no temporary file


def test_read_write_read_round_trip_of_a_foreign_file_with_odd_values(tmp_path):
    make_image(tmp_path / "images" / "a.png")
    xml = tmp_path / "annotations" / "a.xml"
    xml.parent.mkdir()
    xml.write_text(voc_xml(objects=(("cat", "12.3", "7.7", "30.1", "20.9", "1"),)))
    first = read_voc(xml)
    assert first.objects[0].box == pytest.approx((11.3, 6.7, 30.1, 20.9))
    assert read_voc(write_voc(first, tmp_path / "annotations" / "b.xml")) == first


def test_box_past_the_image_is_clipped(tmp_path):
    make_image(tmp_path / "images" / "a.png", size=(20, 10))
    xml = tmp_path / "annotations" / "a.xml"
    xml.parent.mkdir()
    xml.write_text(voc_xml(size=(20, 10), objects=(("cat", -5, 3, 30, 50, 0), ("dog", 0, 0, 20, 10, 0))))
    ann = read_voc(xml)
    assert ann.objects[0].box == (0.0, 2.0, 20.0, 10.0)
    assert ann.objects[1].box == (0.0, 0.0, 20.0, 10.0)  # a 0-based tool's xmin=0 clips to the edge
    # one note, for the box that reached 40 px past the image; xmin=0 (1 px) is a 0-based tool's edge, no note
    assert len(ann.notes) == 1 and "object 1 ('cat')" in ann.notes[0] and "clipped" in ann.notes[0]
    assert "40 px outside the 20×10 image" in ann.notes[0] and "xmin=1 ymin=3 xmax=20 ymax=10" in ann.notes[0]


def test_box_wholly_outside_is_dropped_alone_with_a_note(tmp_path):
    make_image(tmp_path / "images" / "a.png")
    xml = tmp_path / "annotations" / "a.xml"
    xml.parent.mkdir()
    xml.write_text(voc_xml(objects=(("cat", 11, 6, 30, 20, 0), ("dog", 70, 1, 80, 10, 0), ("cat", 2, 2, 8, 8, 0))))
    ann = read_voc(xml)
    assert [(o.name, o.box) for o in ann.objects] == [("cat", (10.0, 5.0, 30.0, 20.0)), ("cat", (1.0, 1.0, 8.0, 8.0))]
    assert len(ann.notes) == 1 and "object 2 ('dog')" in ann.notes[0] and "wholly outside" in ann.notes[0]
    assert "dropped" in ann.notes[0]
    annotations, skips = load_voc_folder(tmp_path)  # the photo stays in the set, with its two good boxes
    assert skips == [] and len(annotations[0].objects) == 2 and annotations[0].notes == ann.notes


def test_missing_size_is_read_from_the_image_header(tmp_path):
    make_image(tmp_path / "images" / "a.png", size=(33, 17))
    xml = tmp_path / "annotations" / "a.xml"
    xml.parent.mkdir()
    xml.write_text(voc_xml(size=None, objects=(("cat", 1, 1, 40, 40, 0),)))
    ann = read_voc(xml)
    assert (ann.width, ann.height) == (33, 17)
    assert ann.objects[0].box == (0.0, 0.0, 33.0, 17.0)


def test_image_is_found_by_basename_not_by_path(tmp_path):
    make_image(tmp_path / "flat" / "a.png")
    xml = tmp_path / "flat" / "a.xml"
    xml.write_text(voc_xml(filename=r"C:\Users\someone\Desktop\a.png", path="/etc/passwd"))
    assert read_voc(xml).image == tmp_path / "flat" / "a.png"  # xml's own folder when there is no ../images
    assert read_voc(xml, images_dir=tmp_path / "elsewhere").image == tmp_path / "elsewhere" / "a.png"


@pytest.mark.parametrize(("xml", "problem"), [
    (voc_xml(objects=()), "no <object>"),
    (voc_xml(objects=(("cat", 70, 1, 80, 10, 0),)), "zero area"),      # entirely right of a 64-px image
    (voc_xml(objects=(("cat", 20, 1, 10, 10, 0),)), "zero area"),      # xmax < xmin
    (voc_xml()[:-5], "malformed XML"),
    (voc_xml(objects=(("cat", "ten", 1, 10, 10, 0),)), "<xmin> is not a number: 'ten'"),
    (voc_xml(objects=(("cat", 1, 1, "nan", 10, 0),)), "<xmax> is not finite"),
    (voc_xml(objects=(("", 1, 1, 10, 10, 0),)), "no <name>"),
    (voc_xml(size=("wide", 48)), "<width> is not a number"),
    (voc_xml(filename=""), "no <filename>"),
    ("<voc><filename>a.png</filename></voc>", "not <annotation>"),
    ('<!DOCTYPE x [<!ENTITY a "aaaa">]>' + voc_xml(), "DTD"),
    ('<!DOCTYPE annotation SYSTEM "http://example.com/evil.dtd">' + voc_xml(), "DTD"),
    (voc_xml().encode("utf-16"), "not UTF-8"),
])
def test_errors_name_the_file_and_the_problem(tmp_path, xml, problem):
    make_image(tmp_path / "images" / "a.png")
    path = tmp_path / "annotations" / "broken-file.xml"
    path.parent.mkdir()
    path.write_bytes(xml if isinstance(xml, bytes) else xml.encode())
    with pytest.raises(VOCError) as info:
        read_voc(path)
    assert str(info.value).startswith(str(path)) and problem in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)


def test_missing_size_and_missing_image_is_an_error_naming_both(tmp_path):
    path = tmp_path / "annotations" / "a.xml"
    path.parent.mkdir()
    path.write_text(voc_xml(size=None))
    with pytest.raises(VOCError, match=r"a\.xml: no usable <size>.*a\.png"):
        read_voc(path)


# --------------------------------------------------------------------------------------------- folders


def test_load_voc_folder_keeps_good_files_and_skips_bad_ones(tmp_path):
    make_pair(tmp_path, "b-good")
    make_pair(tmp_path, "a-good")
    make_pair(tmp_path, "c-malformed", xml="<annotation><filename>", image=False)
    make_pair(tmp_path, "d-no-image", image=False)
    make_pair(tmp_path, "e-wrong-size", size=(48, 64))  # portrait file, landscape annotation, no EXIF
    make_pair(tmp_path, "f-not-an-image", image=False)
    (tmp_path / "images" / "f-not-an-image.png").write_bytes(b"this is not a png")
    annotations, skips = load_voc_folder(tmp_path)
    assert [a.image.name for a in annotations] == ["a-good.png", "b-good.png"]
    assert all(a.notes == () for a in annotations)
    reasons = {path.name: reason for path, reason in skips}
    assert list(reasons) == ["c-malformed.xml", "d-no-image.xml", "e-wrong-size.xml", "f-not-an-image.xml"]
    assert "malformed XML" in reasons["c-malformed.xml"]
    assert "d-no-image.png" in reasons["d-no-image.xml"] and "not found" in reasons["d-no-image.xml"]
    assert "48×64" in reasons["e-wrong-size.xml"] and "64×48" in reasons["e-wrong-size.xml"]
    assert "unreadable image" in reasons["f-not-an-image.xml"]


def truncate(path: Path, cut: int = 20) -> Path:
    """Drop the last ``cut`` bytes, as an interrupted copy does: the header, and PIL's verify(), still pass."""
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    return path


def test_truncated_image_is_skipped_when_the_folder_is_read(tmp_path, caplog):
    for stem in ("a", "b", "c"):
        make_pair(tmp_path, stem, xml=voc_xml(f"{stem}.jpg"))
        Image.open(make_image(tmp_path / "images" / f"{stem}.png")).save(tmp_path / "images" / f"{stem}.jpg")
    truncate(tmp_path / "images" / "b.jpg")
    with Image.open(tmp_path / "images" / "b.jpg") as im:
        im.verify()  # what a header or verify() check sees: nothing wrong
    with caplog.at_level("WARNING"):
        annotations, skips = load_voc_folder(tmp_path)
    assert [a.image.name for a in annotations] == ["a.jpg", "c.jpg"]
    assert len(skips) == 1 and skips[0][0].name == "b.xml"
    assert "b.jpg" in skips[0][1] and "truncated" in skips[0][1]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # returned, for the caller to show once


@pytest.mark.parametrize("folder", ["annots", "Annotations", "XML"])
def test_load_voc_folder_accepts_common_annotation_folder_names(tmp_path, folder):
    for stem in ("x", "y"):
        make_pair(tmp_path, stem)
    (tmp_path / "annotations").rename(tmp_path / folder)
    annotations, skips = load_voc_folder(tmp_path)
    assert skips == [] and [a.source for a in annotations] == [tmp_path / folder / "x.xml", tmp_path / folder / "y.xml"]


def test_an_unknown_annotation_folder_is_refused_with_the_accepted_names(tmp_path):
    make_pair(tmp_path, "x")
    (tmp_path / "annotations").rename(tmp_path / "labels")
    with pytest.raises(VOCError) as info:
        load_voc_folder(tmp_path)
    message = str(info.value)
    for name in ("annotations/", "annots/", "xml/"):
        assert name in message
    assert "labels/" in message and "rename" in message


def test_load_voc_folder_accepts_a_flat_folder_of_xml_and_images(tmp_path):
    for stem in ("x", "y"):
        (tmp_path / f"{stem}.xml").write_text(voc_xml(f"{stem}.png"))
        make_image(tmp_path / f"{stem}.png")
    annotations, skips = load_voc_folder(tmp_path)
    assert skips == [] and [a.image for a in annotations] == [tmp_path / "x.png", tmp_path / "y.png"]


def test_load_voc_folder_without_xml_is_an_error(tmp_path):
    with pytest.raises(VOCError, match="no .xml"):
        load_voc_folder(tmp_path)
    with pytest.raises(VOCError, match="no such folder"):
        load_voc_folder(tmp_path / "missing")


def test_exif_rotated_image_is_turned_upright_only_when_the_size_says_so(tmp_path):
    # stored 48 wide × 64 high with "rotate 90°" in EXIF; annotated as the upright 64×48 image
    make_pair(tmp_path, "rotated", size=(48, 64), rects=(((0, 0, 48, 10), (255, 255, 255)),), exif=6)
    # same EXIF tag, but annotated on the stored pixels (labelImg): keep them as stored
    make_pair(tmp_path, "stored", xml=voc_xml("stored.png", size=(48, 64)), size=(48, 64), exif=6)
    annotations, skips = load_voc_folder(tmp_path)
    assert skips == []
    dataset = VOCBoxes(annotations, ["cat"])
    rotated, _ = dataset[0]
    stored, _ = dataset[1]
    assert rotated.shape == (3, 48, 64) and stored.shape == (3, 64, 48)
    assert rotated[:, :, :10].mean() < 0.1 and rotated[:, :, -10:].mean() > 0.9  # the bright top row is now right


# --------------------------------------------------------------------------------------------- splits


def synthetic(n: int) -> list[VOCAnnotation]:
    return [VOCAnnotation(Path(f"images/raccoon-{i}.jpg"), 100, 80, (VOCObject("raccoon", (1, 2, 50, 60)),))
            for i in range(1, n + 1)]


def test_split_sizes_are_fixed_and_disjoint():
    annotations = synthetic(200)
    train, val = split_annotations(annotations)
    assert (len(train), len(val)) == (160, 40)
    assert {a.image for a in train}.isdisjoint(a.image for a in val)
    assert {a.image for a in train} | {a.image for a in val} == {a.image for a in annotations}
    train_f, val_f = split_annotations(annotations, val=0.2)
    assert (len(train_f), len(val_f)) == (160, 40) and val_f == val  # same seed, same held-out images
    assert split_annotations(synthetic(3), val=0.9)[0]  # a fraction never empties training
    with pytest.raises(ValueError):
        split_annotations(synthetic(10), val=10)
    with pytest.raises(ValueError):
        split_annotations(synthetic(10), val=1.5)


def test_split_is_deterministic_and_independent_of_input_order():
    annotations = synthetic(200)
    shuffled = annotations[:]
    random.Random(123).shuffle(shuffled)
    first = split_annotations(annotations, seed=0)
    assert split_annotations(shuffled, seed=0) == first
    assert split_annotations(annotations, seed=0) == first
    assert split_annotations(annotations, seed=1)[1] != first[1]


def test_class_names_are_sorted_and_unique():
    a = VOCAnnotation(Path("a.png"), 10, 10, (VOCObject("zebra", (0, 0, 5, 5)), VOCObject("ant", (0, 0, 2, 2))))
    b = VOCAnnotation(Path("b.png"), 10, 10, (VOCObject("ant", (0, 0, 5, 5), True),))
    assert class_names([a, b]) == ["ant", "zebra"]


# --------------------------------------------------------------------------------------------- transforms


def test_eval_transform_warps_the_box_with_the_image(tmp_path):
    make_pair(tmp_path, "a")  # 64×48, bright box (10, 5, 30, 20)
    annotations, _ = load_voc_folder(tmp_path)
    image, target = VOCBoxes(annotations, ["cat"], transform=eval_box_transform(32))[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    expected = torch.tensor([5.0, 5 * 32 / 48, 15.0, 20 * 32 / 48])
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor)[0], expected)
    assert target["boxes"].canvas_size == (32, 32) and target["image_size"] == (32, 32)
    torch.testing.assert_close(bright_box(image), expected, atol=1.0, rtol=0)


def test_flip_moves_the_box_with_the_bright_pixels(tmp_path):
    make_pair(tmp_path, "a")
    annotations, _ = load_voc_folder(tmp_path)
    dataset = VOCBoxes(annotations, ["cat"], transform=train_box_transform(64, crop="none"))
    torch.manual_seed(0)
    lefts = set()
    for _ in range(20):
        image, target = dataset[0]
        box = target["boxes"].as_subclass(torch.Tensor)[0]
        torch.testing.assert_close(box, bright_box(image), atol=1.0, rtol=0)
        lefts.add(round(float(box[0])))
    assert lefts == {10, 64 - 30}  # both outcomes seen: unflipped (x0=10) and mirrored (x0=W-x1=34)


def test_iou_crop_never_loses_the_object(tmp_path):
    make_pair(tmp_path, "a", size=(96, 80), xml=voc_xml("a.png", size=(96, 80), objects=(("cat", 41, 31, 60, 50, 0),)),
              rects=(((40, 30, 60, 50), (255, 255, 255)),))
    annotations, _ = load_voc_folder(tmp_path)
    dataset = VOCBoxes(annotations, ["cat"], transform=train_box_transform(48), single_object=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(50):
        image, target = dataset[0]
        assert target["boxes"].shape == (1, 4) and target["labels"].tolist() == [0]
        box = target["boxes"].as_subclass(torch.Tensor)[0]
        assert 0 <= box[0] < box[2] <= 48 and 0 <= box[1] < box[3] <= 48
        torch.testing.assert_close(box, bright_box(image), atol=1.5, rtol=0)
        seen.add(tuple(box.round().tolist()))
    assert len(seen) > 10  # the crop really varied; otherwise this test would prove nothing


def test_iou_crop_keeps_labels_and_difficult_flags_with_their_boxes(tmp_path):
    # a red cat (label 0) and a green dog (label 1, difficult) in opposite corners: crops often drop one
    xml = voc_xml("a.png", size=(96, 96), objects=(("cat", 6, 6, 30, 30, 0), ("dog", 67, 67, 90, 90, 1)))
    make_pair(tmp_path, "a", xml=xml, size=(96, 96),
              rects=(((5, 5, 30, 30), (255, 0, 0)), ((66, 66, 90, 90), (0, 255, 0))))
    annotations, _ = load_voc_folder(tmp_path)
    dataset = VOCBoxes(annotations, ["cat", "dog"], transform=train_box_transform(48, min_scale=0.2))
    torch.manual_seed(0)
    counts = set()
    for _ in range(50):
        image, target = dataset[0]
        boxes, labels, difficult = target["boxes"], target["labels"], target["difficult"]
        assert len(boxes) == len(labels) == len(difficult) >= 1
        for box, label, hard in zip(boxes.as_subclass(torch.Tensor), labels, difficult, strict=True):
            assert bool(hard) == (int(label) == 1)
            x0, y0, x1, y1 = box.ceil().int().tolist()[:2] + box.floor().int().tolist()[2:]
            inside = image[:, y0:y1, x0:x1]
            if inside.numel():
                assert inside[int(label)].mean() > 0.8  # the box holds its own colour, not the other one's
        counts.add(len(boxes))
    assert counts == {1, 2}


def test_unknown_crop_and_bad_size_are_refused():
    with pytest.raises(ValueError, match="crop"):
        train_box_transform(32, crop="random")
    with pytest.raises(ValueError, match="size"):
        eval_box_transform(0)


# --------------------------------------------------------------------------------------------- dataset


def test_dataset_and_collate_shapes(tmp_path):
    make_pair(tmp_path, "a", size=(64, 48))
    make_pair(tmp_path, "b", size=(40, 60), xml=voc_xml("b.png", size=(40, 60),
                                                          objects=(("dog", 1, 1, 10, 10, 0), ("cat", 5, 5, 30, 40, 0))))
    make_pair(tmp_path, "c", size=(30, 30), xml=voc_xml("c.png", size=(30, 30), objects=(("cat", 1, 1, 30, 30, 0),)))
    annotations, _ = load_voc_folder(tmp_path)
    classes = class_names(annotations)
    assert classes == ["cat", "dog"]
    loader = DataLoader(VOCBoxes(annotations, classes, size=32), batch_size=2, collate_fn=collate)
    batches = list(loader)
    images, targets = batches[0]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and type(images) is torch.Tensor
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert [len(t["boxes"]) for t in targets] == [1, 2]
    assert targets[1]["labels"].tolist() == [1, 0] and targets[1]["labels"].dtype == torch.int64
    assert isinstance(targets[1]["boxes"], tv_tensors.BoundingBoxes) and targets[1]["image_size"] == (32, 32)
    assert batches[1][0].shape == (1, 3, 32, 32)
    assert primary_boxes(targets).shape == (2, 4)


def test_without_a_transform_images_are_float_at_their_own_size(tmp_path):
    make_pair(tmp_path, "a", size=(64, 48))
    annotations, _ = load_voc_folder(tmp_path)
    image, target = VOCBoxes(annotations, ["cat"])[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and target["image_size"] == (48, 64)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor)[0], bright_box(image))
    with pytest.raises(ValueError, match="differ in shape"):
        collate([(image, target), (torch.zeros(3, 20, 20), target)])


def test_single_object_is_the_largest_non_difficult_one():
    ann = VOCAnnotation(Path("a.png"), 100, 100, (
        VOCObject("cat", (0, 0, 10, 10)),
        VOCObject("dog", (0, 0, 90, 90), difficult=True),  # largest, but difficult
        VOCObject("cat", (5, 5, 25, 25)),
        VOCObject("dog", (50, 50, 70, 70)),                  # ties with the one before: the first wins
    ))
    assert primary_object(ann) == ann.objects[2]
    everything_difficult = VOCAnnotation(Path("b.png"), 10, 10, (VOCObject("cat", (0, 0, 2, 2), True),
                                                                 VOCObject("cat", (0, 0, 5, 5), True)))
    assert primary_object(everything_difficult) == everything_difficult.objects[1]
    target = VOCBoxes([ann], ["cat", "dog"]).target(ann)
    torch.testing.assert_close(primary_box(target), torch.tensor([5.0, 5.0, 25.0, 25.0]))
    single = VOCBoxes([ann], ["cat", "dog"], single_object=True).target(ann)
    assert single["boxes"].tolist() == [[5.0, 5.0, 25.0, 25.0]] and single["labels"].tolist() == [0]
    with pytest.raises(ValueError, match="no boxes"):
        primary_box({"boxes": torch.zeros(0, 4)})


def test_unreadable_image_is_dropped_by_collate(tmp_path, caplog):
    make_pair(tmp_path, "a")
    make_pair(tmp_path, "b")
    annotations, _ = load_voc_folder(tmp_path)
    data = (tmp_path / "images" / "b.png").read_bytes()
    (tmp_path / "images" / "b.png").write_bytes(data[: len(data) // 2])  # truncated after the header check
    dataset = VOCBoxes(annotations, ["cat"], size=16)
    images, targets = collate([dataset[0], dataset[1]])
    assert images.shape == (1, 3, 16, 16) and targets[0]["path"].endswith("a.png")
    assert dataset.skipped_files == {str(tmp_path / "images" / "b.png")}
    assert collate([dataset[1]]) is None


def test_dataset_refuses_names_missing_from_classes_and_double_resizing():
    ann = synthetic(1)
    with pytest.raises(ValueError, match="raccoon"):
        VOCBoxes(ann, ["cat"])
    with pytest.raises(ValueError, match="not both"):
        VOCBoxes(ann, ["raccoon"], transform=eval_box_transform(8), size=8)


def test_containing_crop_keeps_the_object_whole_and_moves_it():
    from vggnet.data.voc import RandomContainingCrop

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.zeros(3, 60, 80, dtype=torch.uint8))
    box = tv_tensors.BoundingBoxes(torch.tensor([[20.0, 10.0, 50.0, 40.0]]), format="XYXY", canvas_size=(60, 80))
    crop = RandomContainingCrop()
    seen = set()
    for _ in range(50):
        out_image, out_box = crop(image, box)
        x0, y0, x1, y1 = out_box[0].tolist()
        assert (x1 - x0, y1 - y0) == (30.0, 30.0)  # never cut
        assert x0 >= 0 and y0 >= 0 and x1 <= out_image.shape[-1] and y1 <= out_image.shape[-2]
        seen.add((x0, y0, out_image.shape[-1], out_image.shape[-2]))
    assert len(seen) > 10  # the object moves about the view
