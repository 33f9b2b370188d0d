"""PASCAL VOC box annotations (one XML file per image): read, checked, split and served with box-aware augmentation.

This feeds the paper's localisation task (Appendix A: a VGG whose last layer regresses a box). torchvision's
``VOCDetection`` only knows the official devkit layout, trusts every file and returns dicts of strings; a
regression target needs numbers in one stated convention, a bad file named rather than a crash epochs in,
and augmentation that moves the box with the pixels. All box arithmetic under augmentation (flip, crop,
resize, clamp) is torchvision.transforms.v2 acting on ``tv_tensors.BoundingBoxes``; nothing here re-derives it.

Coordinate convention. The devkit writes 1-based *inclusive pixel indices*: ``xmin=1, xmax=10`` means the
first ten pixel columns. In Python every box is in *pixel-edge* coordinates, which is what torchvision's XYXY
means: ``(xmin - 1, ymin - 1, xmax, ymax)``, so that example is ``x0=0, x1=10`` (width 10), and a box over
the whole W×H image is ``(0, 0, W, H)``. :func:`write_voc` applies the inverse. Boxes are clipped to the
image and rounded to 1e-4 px, so fractional coordinates (some tools write them) survive read→write→read.

Orientation. The pixels a box refers to are the pixels *as stored*: labelImg and the VOC devkit never apply
EXIF orientation, and a box drawn on the stored frame would land on the wrong region if the image were
rotated first. So images are not ``exif_transpose``-d, with one exception that the file itself proves: when
the stored image is H×W while the annotation's ``<size>`` says W×H and the EXIF orientation is a 90° one,
the annotating tool evidently worked on the upright image (CVAT, Roboflow exports do), and so do we. For a
180° or mirrored orientation the size cannot tell the two apart, and the stored frame is used.

Nothing here touches the network, training or serving code.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size  # what v2's own crops use to read (H, W)

from vggnet import progress as vprogress
from vggnet.atomic import atomic_path
from vggnet.errors import UsageError

from .folder import IMAGE_ERRORS, DataError

log = logging.getLogger(__name__)

__all__ = [
    "ANNOTATION_DIRS", "MAX_XML_BYTES", "VOCAnnotation", "VOCBoxes", "VOCError", "VOCObject", "class_names",
    "collate", "eval_box_transform", "find_annotation_dir", "load_voc_folder", "primary_box", "primary_boxes",
    "primary_object", "read_voc", "split_annotations", "train_box_transform", "write_voc",
]

Box = tuple[float, float, float, float]
MAX_XML_BYTES = 16 * 2**20  # a VOC file is a few KB; even 10k objects fit in 4 MB
_DECIMALS = 4
_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
# Folder names (any case) that hold the XML, in order of preference: ours, the devkit's, then what other tools and
# hand-made sets use. A set whose XML sits elsewhere is refused with this list, not silently read as empty.
ANNOTATION_DIRS = ("annotations", "Annotations", "annots", "annot", "annotation", "xml", "xmls")
_CLIP_TOLERANCE = 1.0  # px: xmin=0 from a 0-based tool is the edge, not a box reaching outside worth a note
_IMAGE_DIRS = ("images", "JPEGImages")  # our layout, then the devkit's
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # the EXIF orientations that swap width and height
_TRANSFORM_RETRIES = 10


class VOCError(DataError):
    """A VOC file (or its image) that cannot be used; the message starts with the path, then the problem."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # DataLoader workers pickle exceptions; the default needs args == (msg,)
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class VOCObject:
    """One labelled box; ``box`` is (x0, y0, x1, y1) in pixel-edge coordinates (see the module docstring)."""

    name: str
    box: Box
    difficult: bool = False

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class VOCAnnotation:
    """One image and its boxes. ``width``/``height`` are the frame the boxes live in (the ``<size>`` element).

    ``source`` is the XML file it came from, kept only so errors can name it; ``notes`` are what reading
    changed without refusing the file (a box clipped to the image, a box wholly outside it dropped), one line
    each, for the caller to show once. Both are left out of equality so that an annotation written elsewhere
    and read back compares equal.
    """

    image: Path
    width: int
    height: int
    objects: tuple[VOCObject, ...]
    source: Path | None = field(default=None, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)


# --------------------------------------------------------------------------------------------- reading


def _parse(path: Path) -> ET.Element:
    """The root element, refusing what a VOC file never contains but an attack needs.

    ``defusedxml`` is not a dependency, so this is the standard library's ElementTree with two guards.
    ElementTree never fetches external entities or DTDs; the remaining risk is entity expansion
    (billion laughs, quadratic blow-up), which expat ≥ 2.4 (Python 3.11 ships 2.5) already caps. On top of
    that a size limit and a refusal of any DTD or entity declaration: VOC files have neither, so nothing
    legitimate is lost. UTF-16/32 files are refused too, since the byte check could not see into them.
    """
    try:
        size = path.stat().st_size
        if size > MAX_XML_BYTES:
            raise VOCError(path, f"{size:,} bytes is too large for a VOC annotation (limit {MAX_XML_BYTES:,})")
        data = path.read_bytes()
    except OSError as exc:
        raise VOCError(path, f"cannot be read ({exc.strerror or exc})") from None
    if b"\x00" in data:
        raise VOCError(path, "not UTF-8/ASCII text (UTF-16/32 or binary); VOC annotations are UTF-8 XML")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise VOCError(path, "declares a DTD or entities, which VOC annotations never need; refused as unsafe")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise VOCError(path, f"malformed XML ({exc})") from None


def _number(text: str | None, what: str, path: Path) -> float:
    if text is None or not text.strip():
        raise VOCError(path, f"{what} is missing")
    try:
        value = float(text)
    except ValueError:
        raise VOCError(path, f"{what} is not a number: {text.strip()!r}") from None
    if not math.isfinite(value):
        raise VOCError(path, f"{what} is not finite: {text.strip()!r}")
    return value


def _flag(text: str | None, what: str, path: Path) -> bool:
    value = (text or "0").strip().lower()
    if value in ("0", "false", "no", ""):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise VOCError(path, f"{what} must be 0 or 1, got {value!r}")


def _clip(value: float, limit: int) -> float:
    """Into [0, limit], rounded so fractional values survive a write/read cycle (and -0.0 cannot appear)."""
    return 0.0 if value <= 0 else round(min(value, float(limit)), _DECIMALS)


def _image_candidates(xml_path: Path, name: str, images_dir: str | os.PathLike | None) -> list[Path]:
    if images_dir is not None:
        return [Path(images_dir) / name]
    folder = xml_path.parent
    return [folder.parent / d / name for d in _IMAGE_DIRS] + [folder / name]


def _image_size(image: Path, xml_path: Path) -> tuple[int, int]:
    try:
        with Image.open(image) as im:
            return im.size  # the stored frame: see the module docstring on orientation
    except IMAGE_ERRORS as exc:
        raise VOCError(xml_path, f"no usable <size>, and the image {image} cannot be read to get it "
                                 f"({type(exc).__name__}: {exc})") from None


def _size(root: ET.Element, xml_path: Path, image: Path) -> tuple[int, int]:
    """``<size>`` when it is there; 0×0 (written by tools that did not know) or missing: the image header."""
    size = root.find("size")
    if size is not None and (size.findtext("width") or "").strip() and (size.findtext("height") or "").strip():
        width = _number(size.findtext("width"), "<size><width>", xml_path)
        height = _number(size.findtext("height"), "<size><height>", xml_path)
        if width > 0 and height > 0:
            if width != int(width) or height != int(height):
                raise VOCError(xml_path, f"<size> {width}×{height} is not a whole number of pixels")
            return int(width), int(height)
    return _image_size(image, xml_path)


def _object(element: ET.Element, index: int, width: int, height: int,
            path: Path) -> tuple[VOCObject | None, str | None]:
    """The object and a note when its box was clipped; ``(None, why)`` when the box lies wholly outside the image.

    A box wholly outside costs only itself, not the photo's other boxes; an empty or inverted box is a broken
    file and raises. Going past an edge by up to 1 px is clipped without a note (0-based tools write xmin=0).
    """
    name = (element.findtext("name") or "").strip()
    where = f"object {index + 1}" + (f" ({name!r})" if name else "")
    if not name:
        raise VOCError(path, f"{where} has no <name>")
    bndbox = element.find("bndbox")  # a direct child: <part> elements carry their own boxes
    if bndbox is None:
        raise VOCError(path, f"{where} has no <bndbox>")
    xmin, ymin, xmax, ymax = (_number(bndbox.findtext(tag), f"{where} <{tag}>", path) for tag in _BOX_TAGS)
    raw = (xmin - 1, ymin - 1, xmax, ymax)
    box = (_clip(raw[0], width), _clip(raw[1], height), _clip(raw[2], width), _clip(raw[3], height))
    given = f"{where} box xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}"
    if box[2] <= box[0] or box[3] <= box[1]:
        if raw[2] > raw[0] and raw[3] > raw[1]:  # a real box, just not on this image
            return None, f"{given} lies wholly outside the {width}×{height} image"
        raise VOCError(path, f"{given} has zero area once clipped to the {width}×{height} image")
    difficult = _flag(element.findtext("difficult"), f"{where} <difficult>", path)
    past = max(-raw[0], -raw[1], raw[2] - width, raw[3] - height)
    note = None
    if past > _CLIP_TOLERANCE:
        note = f"{given} reaches {past:g} px outside the {width}×{height} image; clipped to {_fmt_box(box)}"
    return VOCObject(name, box, difficult), note


def _fmt_box(box: Box) -> str:
    """Pixel-edge box as the devkit's 1-based inclusive numbers, the convention the user's file is in."""
    x0, y0, x1, y1 = box
    return f"xmin={_fmt(x0 + 1)} ymin={_fmt(y0 + 1)} xmax={_fmt(x1)} ymax={_fmt(y1)}"


def read_voc(xml_path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> VOCAnnotation:
    """One VOC XML file as a :class:`VOCAnnotation`, or a :class:`VOCError` naming the file and the problem.

    The image is ``<filename>`` (its last component only, so ``../../x`` or a Windows path cannot point
    elsewhere) looked up in ``images_dir``, else in ``../images`` or ``../JPEGImages`` beside the XML's folder,
    else in the XML's own folder; ``<path>`` is ignored, as it records the annotator's machine. The image need
    not exist unless ``<size>`` is missing (:func:`load_voc_folder` checks it); when none is found the path
    is the first place looked. Parsing is hardened without ``defusedxml`` (not installed); see :func:`_parse`.
    """
    xml_path = Path(xml_path)
    root = _parse(xml_path)
    if root.tag != "annotation":
        raise VOCError(xml_path, f"root element is <{root.tag}>, not <annotation>; not a VOC file")
    filename = (root.findtext("filename") or "").strip()
    name = PureWindowsPath(filename).name  # splits on both / and \
    if name in ("", ".", ".."):
        raise VOCError(xml_path, "no <filename> naming the image")
    candidates = _image_candidates(xml_path, name, images_dir)
    image = next((c for c in candidates if c.is_file()), candidates[0])
    width, height = _size(root, xml_path, image)
    elements = root.findall("object")
    if not elements:
        raise VOCError(xml_path, "has no <object>; a box dataset needs at least one box per image")
    read = [_object(el, i, width, height, xml_path) for i, el in enumerate(elements)]
    objects = tuple(obj for obj, _ in read if obj is not None)
    if not objects:
        raise VOCError(xml_path, "no box left: every one has zero area once clipped to the image ("
                                 + "; ".join(note for _, note in read if note) + ")")
    notes = tuple(note if obj is not None else f"{note}; dropped, the image's other boxes are kept"
                  for obj, note in read if note)
    return VOCAnnotation(image, width, height, objects, source=xml_path, notes=notes)


# --------------------------------------------------------------------------------------------- writing


def _fmt(value: float) -> str:
    value = round(value, _DECIMALS)
    return str(int(value)) if value == int(value) else repr(value)


def _add(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    child = ET.SubElement(parent, tag)
    if text is not None:
        child.text = text
    return child


def write_voc(annotation: VOCAnnotation, xml_path: str | os.PathLike) -> Path:
    """Write ``annotation`` as devkit-style XML (1-based inclusive coordinates), atomically; returns the path.

    Only what :class:`VOCAnnotation` holds is written (no pose/truncated/segmented beyond defaults), and an
    annotation :func:`read_voc` would refuse is refused here, so a written file always reads back equal
    (with the image found the same way: put it in ``../images`` or pass the same ``images_dir``).
    """
    xml_path = Path(xml_path)
    a = annotation
    if a.width <= 0 or a.height <= 0:
        raise VOCError(xml_path, f"image size {a.width}×{a.height} must be positive")
    if not a.objects:
        raise VOCError(xml_path, "annotation has no objects")
    root = ET.Element("annotation")
    _add(root, "folder", a.image.parent.name)
    _add(root, "filename", a.image.name)
    size = _add(root, "size")
    for tag, value in (("width", a.width), ("height", a.height), ("depth", 3)):
        _add(size, tag, str(value))
    _add(root, "segmented", "0")
    for i, obj in enumerate(a.objects):
        x0, y0, x1, y1 = obj.box
        if not (0 <= x0 < x1 <= a.width and 0 <= y0 < y1 <= a.height) or not obj.name.strip():
            raise VOCError(xml_path, f"object {i + 1} ({obj.name!r}) box {obj.box} is empty, unnamed or outside "
                                     f"the {a.width}×{a.height} image")
        element = _add(root, "object")
        _add(element, "name", obj.name)
        _add(element, "pose", "Unspecified")
        _add(element, "truncated", "0")
        _add(element, "difficult", str(int(obj.difficult)))
        bndbox = _add(element, "bndbox")
        for tag, value in zip(_BOX_TAGS, (x0 + 1, y0 + 1, x1, y1), strict=True):
            _add(bndbox, tag, _fmt(value))
    ET.indent(root, space="\t")
    with atomic_path(xml_path) as tmp, open(tmp, "wb") as f:  # a crash never leaves half an annotation behind
        ET.ElementTree(root).write(f, encoding="utf-8", xml_declaration=False)
        f.write(b"\n")
    return xml_path


# --------------------------------------------------------------------------------------------- images


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (*IMAGE_ERRORS, TypeError, LookupError):  # a corrupt EXIF block, or a tag of the wrong type
        return 1


def _frame_plan(image: Image.Image, annotation: VOCAnnotation) -> bool:
    """Whether the annotation's frame is the EXIF-upright one (True) or the stored one (False); else VOCError."""
    if image.size == (annotation.width, annotation.height):
        return False
    if image.size == (annotation.height, annotation.width) and \
            _exif_orientation(image) in _TRANSPOSING_ORIENTATIONS:
        return True
    raise VOCError(annotation.image, f"image is {image.width}×{image.height} but its annotation "
                                     f"{annotation.source or ''} says {annotation.width}×{annotation.height}")


def _check_image(annotation: VOCAnnotation) -> None:
    """That the image exists, fits the boxes and decodes to its last byte.

    The whole image is decoded (``load()``), not just its header read or ``verify()``-ed: a JPEG missing its
    last bytes passes both and only fails when its pixels are needed, which is epochs into training or after
    every protocol of an evaluation. Decoding once here costs about a second per few hundred photos, and
    it makes training and evaluation agree on which images exist, so the seeded split is the same for both.
    """
    if not annotation.image.is_file():
        raise VOCError(annotation.image, "image not found (looked beside the annotations in ../images, "
                                         "../JPEGImages and the XML folder; pass images_dir to look elsewhere)")
    try:
        with Image.open(annotation.image) as image:
            _frame_plan(image, annotation)
            image.load()
    except VOCError:
        raise
    except IMAGE_ERRORS as exc:
        raise VOCError(annotation.image, f"unreadable image ({type(exc).__name__}: {exc})") from None


def read_pixels(annotation: VOCAnnotation) -> tv_tensors.Image:
    """uint8 RGB (3, H, W) in the frame the boxes refer to (see the module docstring on orientation)."""
    with Image.open(annotation.image) as image:
        upright = _frame_plan(image, annotation)
        image.load()  # a truncated file fails here, inside the caller's error handling
        frame = ImageOps.exif_transpose(image) if upright else image
        return tv_tensors.Image(F.pil_to_tensor(frame.convert("RGB")))


# --------------------------------------------------------------------------------------------- folders


def _xml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml" and not p.name.startswith(".")
                  and p.is_file())


def find_annotation_dir(root: str | os.PathLike) -> Path | None:
    """The folder of ``root``'s VOC XML: the first of :data:`ANNOTATION_DIRS` (any case) holding .xml files,
    else ``root`` itself when it holds them; None when neither does."""
    root = Path(root)
    children = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}
    for name in ANNOTATION_DIRS:
        folder = children.get(name.lower())
        if folder is not None and _xml_files(folder):
            return folder
    return root if _xml_files(root) else None


def _no_xml_error(root: Path) -> VOCError:
    """Names the folders looked in and, when the XML is somewhere else, where it is."""
    names = ", ".join(f"{name}/" for name in dict.fromkeys(n.lower() for n in ANNOTATION_DIRS))
    elsewhere = [p.name for p in sorted(root.iterdir()) if p.is_dir() and _xml_files(p)]
    hint = (f"; the .xml files in {', '.join(f'{n}/' for n in elsewhere)} are not read: rename the folder to "
            "annotations/" if elsewhere else "")
    return VOCError(root, f"holds no .xml annotation files, neither itself nor in a sub-folder named {names} "
                          f"(any case){hint}")


def load_voc_folder(root: str | os.PathLike, images_dir: str | os.PathLike | None = None, *,
                    progress: bool | None = None) -> tuple[list[VOCAnnotation], list[tuple[Path, str]]]:
    """(annotations, skips) for every ``root/annotations/*.xml`` (or another of :data:`ANNOTATION_DIRS`, or
    ``root/*.xml``), sorted.

    A bad file should cost one image, not the run: malformed or invalid XML, and images that are missing,
    unreadable, truncated or of another size than annotated, become ``(xml_path, reason)`` skips. They are
    returned, not logged as warnings, so a command shows each once (logged at INFO for library users who
    configure logging). A folder with no XML at all is an error, since that is a wrong path, not a bad file.
    Decoding every photo takes a minute for a full PASCAL VOC year, so ``progress`` (None or True) reports it: a
    bar on a terminal, elsewhere a line every 30 s with the time left once it has run that long; False: nothing.
    """
    root = Path(root)
    if not root.is_dir():
        raise VOCError(root, "no such folder; pass a folder holding annotations/*.xml and images/ "
                             "(or a folder of .xml files)")
    xml_dir = find_annotation_dir(root)
    if xml_dir is None:
        raise _no_xml_error(root)
    annotations: list[VOCAnnotation] = []
    skips: list[tuple[Path, str]] = []
    files = _xml_files(xml_dir)
    for path in vprogress.progress_bar(files, total=len(files), desc=f"reading {xml_dir}", unit="image",
                                       progress=progress, leave=False):
        try:
            annotation = read_voc(path, images_dir)
            _check_image(annotation)
        except VOCError as exc:
            reason = exc.reason if exc.path == path else f"{exc.path}: {exc.reason}"
            log.info("skipping %s: %s", path, reason)
            skips.append((path, reason))
            continue
        annotations.append(annotation)
    return annotations, skips


def _order_key(annotation: VOCAnnotation) -> tuple[str, str, str]:
    return annotation.image.name, annotation.image.as_posix(), str(annotation.source or "")


def split_annotations(annotations: Sequence[VOCAnnotation], val: int | float = 40,
                      seed: int = 0) -> tuple[list[VOCAnnotation], list[VOCAnnotation]]:
    """(train, val): ``val`` images (an int) or that fraction (a float in [0, 1)) held out with a fixed seed.

    Sorted by image name before shuffling, so the split depends on the files, not on listing order, and the
    same seed holds out the same images on every machine. Not stratified: with several classes per image there
    is no single label to stratify on. At least one image always stays in training.
    """
    ordered = sorted(annotations, key=_order_key)
    n = len(ordered)
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise TypeError(f"val must be an int (a count) or a float (a fraction), got {val!r}")
    if isinstance(val, float):
        if not 0.0 <= val < 1.0:
            raise UsageError(f"a fractional val must be in [0, 1), got {val}")
        k = min(max(round(n * val), 1 if val > 0 else 0), max(n - 1, 0))
    else:
        k = val
        if not 0 <= k < max(n, 1):
            raise UsageError(f"val={k} must leave at least one of the {n} annotations for training")
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:k].tolist())
    return ([a for i, a in enumerate(ordered) if i not in held],
            [a for i, a in enumerate(ordered) if i in held])


def class_names(annotations: Sequence[VOCAnnotation]) -> list[str]:
    """Sorted unique object names: label ``i`` is ``class_names(...)[i]`` for every split built from them."""
    return sorted({obj.name for a in annotations for obj in a.objects})


# --------------------------------------------------------------------------------------------- targets


def primary_object(annotation: VOCAnnotation) -> VOCObject:
    """The object a one-box regressor should predict: the largest non-difficult one (largest of all when every
    object is difficult), the first on ties, so the choice is the same on every run."""
    pool = [o for o in annotation.objects if not o.difficult] or list(annotation.objects)
    return max(pool, key=lambda o: o.area)  # max keeps the first of equal areas


def primary_box(target: dict[str, Any]) -> torch.Tensor:
    """Float (4,) XYXY box of the largest non-difficult box in ``target`` (after any transform); see
    :func:`primary_object`. Raises ValueError for a target with no box left."""
    boxes = target["boxes"]
    if isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
        boxes = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    boxes = boxes.as_subclass(torch.Tensor).float()
    if boxes.shape[0] == 0:
        raise ValueError("target has no boxes (did the transform crop them all away?)")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    difficult = target.get("difficult")
    if difficult is not None and not bool(difficult.all()):
        area = area.masked_fill(difficult.bool(), -1.0)
    return boxes[int(area.argmax())].clone()  # argmax returns the first maximum


def primary_boxes(targets: Sequence[dict[str, Any]]) -> torch.Tensor:
    """(B, 4) regression targets for a collated batch: :func:`primary_box` of each."""
    return torch.stack([primary_box(t) for t in targets])


# --------------------------------------------------------------------------------------------- transforms


def box_fields(inputs: Any) -> tuple[torch.Tensor, ...] | None:
    """``labels_getter`` for SanitizeBoundingBoxes: ``labels`` *and* ``difficult`` must be dropped with their
    boxes, and the default getter only knows ``labels``. Module-level so DataLoader workers can pickle it."""
    target = inputs[1] if isinstance(inputs, tuple | list) and len(inputs) > 1 else inputs
    if not isinstance(target, dict):
        return None
    fields = tuple(target[k] for k in ("labels", "difficult") if isinstance(target.get(k), torch.Tensor))
    return fields or None


class RandomContainingCrop(v2.Transform):
    """A random crop that contains every box whole: each side is drawn uniformly between the image's edge and
    the boxes' outermost extent on that side (``p``: how often a crop is made at all).

    Unlike ``RandomIoUCrop`` it never cuts the object, so the target is always the whole object, at a
    position and scale in the view that varies from draw to draw: a box regressor cannot then score well by
    answering "the object fills the view". That is the crop the paper's localisation training needs.
    """

    def __init__(self, p: float = 1.0) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        boxes = [x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)]
        if torch.rand(()) >= self.p or not boxes or boxes[0].numel() == 0:
            return {"top": 0, "left": 0, "height": height, "width": width}
        xyxy = v2.functional.convert_bounding_box_format(boxes[0], new_format=tv_tensors.BoundingBoxFormat.XYXY)
        x0, y0 = (int(v) for v in xyxy[:, :2].min(0).values.floor().tolist())
        x1, y1 = (int(v) for v in xyxy[:, 2:].max(0).values.ceil().tolist())
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        left = int(torch.randint(0, x0 + 1, ()))
        top = int(torch.randint(0, y0 + 1, ()))
        right = int(torch.randint(x1, width + 1, ()))
        bottom = int(torch.randint(y1, height + 1, ()))
        return {"top": top, "left": left, "height": max(1, bottom - top), "width": max(1, right - left)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _finish(steps: list[Any], size: int, mean: Sequence[float] | None,
            std: Sequence[float] | None) -> v2.Compose:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    # A warp to size×size, not an aspect-preserving resize: the paper's localisation nets see a fixed square
    # crop, and a warp keeps the whole object in view with boxes that v2 scales exactly per axis.
    steps += [v2.Resize((size, size), antialias=True), v2.ClampBoundingBoxes(),
              v2.ToDtype(torch.float32, scale=True)]
    if mean is not None or std is not None:
        steps.append(v2.Normalize(list(mean or (0.0, 0.0, 0.0)), list(std or (1.0, 1.0, 1.0))))
    return v2.Compose(steps)


def train_box_transform(size: int, *, flip: bool = True, crop: str = "iou", min_scale: float = 0.3,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        zoom_out: float = 1.0) -> v2.Compose:
    """Geometric, box-aware augmentation for ``(image, target)``: flip, a crop that keeps an object, warp to
    ``size``×``size``, float in [0, 1] (normalised only when ``mean``/``std`` are given).

    ``crop="iou"`` is SSD's ``v2.RandomIoUCrop``: a crop is only accepted when some box's centre lies inside
    it (one draw in seven keeps the whole image), and ``v2.SanitizeBoundingBoxes`` then drops boxes whose
    centres fell outside, with their labels and difficult flags. So at least one object always survives,
    clipped to what the crop shows, which is also what a box regressor trained on crops should predict.
    ``crop="contain"`` is :class:`RandomContainingCrop`: the objects stay whole and move about the view.
    ``crop="none"`` is flip and warp only. ``zoom_out`` > 1 first places the image, half the time, on a
    canvas up to that many times larger (``v2.RandomZoomOut``, filled with mid-grey), so objects are also
    seen smaller than in the photos. No photometric change: colour jitter is a separate decision.
    """
    steps: list[Any] = [v2.ToImage()]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if zoom_out > 1:
        steps.append(v2.RandomZoomOut(fill=128, side_range=(1.0, zoom_out), p=0.5))
    if crop == "iou":
        steps += [v2.RandomIoUCrop(min_scale=min_scale), v2.SanitizeBoundingBoxes(labels_getter=box_fields)]
    elif crop == "contain":
        steps.append(RandomContainingCrop())
    elif crop != "none":
        raise ValueError(f"crop must be 'iou', 'contain' or 'none', got {crop!r}")
    return _finish(steps, size, mean, std)


def eval_box_transform(size: int, *, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> v2.Compose:
    """Deterministic counterpart of :func:`train_box_transform`: warp to ``size``×``size``, float in [0, 1]."""
    return _finish([v2.ToImage()], size, mean, std)


# --------------------------------------------------------------------------------------------- dataset

Target = dict[str, Any]


class VOCBoxes(Dataset):
    """``(image, target)`` per annotation; an image that cannot be decoded yields ``None`` (see :func:`collate`).

    ``image`` is a float32 (3, H, W) tensor in [0, 1] (unless the transform normalises): the transforms end in
    float, and without one the uint8 pixels are converted, so every path gives the same type. ``target`` holds
    ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels in the returned image's frame), ``labels`` (int64
    indices into ``classes``), ``difficult`` (bool), ``image_size`` ((H, W) of the returned image) and
    ``path`` (str). ``size`` is shorthand for ``transform=eval_box_transform(size)``. With ``single_object``
    only :func:`primary_object` is kept, chosen before augmentation so a crop cannot change which object
    is the target. If a transform leaves no box, it is retried (up to 10 draws) before the empty target is
    returned.
    """

    def __init__(self, annotations: Sequence[VOCAnnotation], classes: Sequence[str],
                 transform: Callable[..., Any] | None = None, size: int | None = None,
                 single_object: bool = False) -> None:
        if transform is not None and size is not None:
            raise ValueError("give either transform or size (size= means eval_box_transform(size)), not both")
        self.annotations = list(annotations)
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({o.name for a in self.annotations for o in a.objects} - set(self.class_to_idx))
        if unknown:
            raise DataError(f"object names {unknown} are not in classes {self.classes}; build classes with "
                             "class_names() over all splits")
        self.transform = eval_box_transform(size) if size is not None else transform
        self.single_object = single_object
        self.skipped_files: set[str] = set()

    def __len__(self) -> int:
        return len(self.annotations)

    def target(self, annotation: VOCAnnotation) -> Target:
        """The untransformed target, in the annotation's own frame."""
        objects = [primary_object(annotation)] if self.single_object else list(annotation.objects)
        boxes = torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(annotation.height, annotation.width)),
            "labels": torch.tensor([self.class_to_idx[o.name] for o in objects], dtype=torch.int64),
            "difficult": torch.tensor([o.difficult for o in objects], dtype=torch.bool),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target] | None:
        annotation = self.annotations[index]
        try:
            pixels = read_pixels(annotation)
        except IMAGE_ERRORS as exc:  # VOCError (size mismatch) is a ValueError too
            key = str(annotation.image)
            if key not in self.skipped_files:
                self.skipped_files.add(key)
                log.warning("skipping unreadable image %s (%s)", key, exc)
            return None
        target = self.target(annotation)
        image: Any = pixels
        if self.transform is not None:
            for _ in range(_TRANSFORM_RETRIES):
                image, out = self.transform(pixels, dict(target))
                if out["boxes"].shape[0] > 0:
                    break
            target = out
        if not image.is_floating_point():
            image = F.to_dtype(image, torch.float32, scale=True)
        target["image_size"] = (int(image.shape[-2]), int(image.shape[-1]))
        target["path"] = str(annotation.image)
        return image, target


def collate(batch: Sequence[tuple[torch.Tensor, Target] | None]) -> tuple[torch.Tensor, list[Target]] | None:
    """``(images (B, 3, H, W), targets)`` with targets kept as a list, since box counts differ per image.

    ``None`` samples (unreadable images) are dropped; a batch of only those gives ``None``. Images must share
    one size: use ``size=`` or a transform from this module, which all end in a fixed-size warp.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    shapes = {tuple(image.shape) for image, _ in kept}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch differ in shape {sorted(shapes)}; give VOCBoxes size= or a "
                         "transform that resizes to a fixed size")
    images = torch.stack([image.as_subclass(torch.Tensor) for image, _ in kept])
    return images, [target for _, target in kept]
