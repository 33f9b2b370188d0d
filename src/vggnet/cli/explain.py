"""``vggnet explain``: Grad-CAM overlays per image, first-layer filters, and feature maps by layer name."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from vggnet.errors import UsageError

EPILOG = """\
what is written (into --out, created if missing; files of the same name are replaced):
  <image stem>.gradcam.png         input crop | heat map over it, dashed box, top-k labels in the title;
                                   an all-zero map is captioned "no positive evidence for CLASS at LAYER"
                                   (also printed), rather than drawn as a blank overlay
  <image stem>.<LAYER>.png         with --feature-maps LAYER: that layer's activation maps for the image
  filters.png                      with --filters: the first conv layer's filters
  Two images with the same stem (a/cat.png, b/cat.jpg) get cat.gradcam.png and cat-2.gradcam.png.

Grad-CAM (Selvaraju et al. 2017): the chosen layer's maps weighted by the spatial mean of the class score's
  gradient, summed, rectified, resized to the input crop and scaled to peak 1. The default layer is the deepest
  conv ReLU whose map is 4x4 or finer: at 224 px the last conv's (relu5_3 for VGG-16, relu5_2 for VGG-11/13,
  14x14), the most class-specific grid; at 32 px block 5 is 2x2, one blob, so block 4's last ReLU. Earlier
  layers (relu4_3, block3_conv3) are sharper but less selective.

layer names: vggnet's (block5_conv3, block5_relu3, block4_pool), style-transfer / LPIPS (conv5_3, relu5_3,
  pool4), torchvision's index (features.29). Layers after the fc/gap heads' flatten have no positions and are
  refused; the conv head's fc6..fc8 are grids (fc8 is the class-score map).

exit status: 0 when every image was explained; 1 when any could not be read (each skip is reported on stderr,
  the others are still written), as `vggnet predict`; 2 for a bad option, layer, class or checkpoint.

examples:
  vggnet explain --ckpt runs/cifar10 cat.png dog.jpg
  vggnet explain --ckpt runs/cifar10 --class dog --layer relu4_3 --out why/ 'shots/*.png'
  vggnet explain --ckpt runs/cifar10 --filters --feature-maps block2_conv1 cat.png
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="Grad-CAM heat maps for images, first-layer filters, feature maps by layer name",
        description=textwrap.fill(
            "Show where a trained VGG finds the evidence for its answer. Each image is preprocessed exactly as "
            "the checkpoint records (shorter side to the training crop, centre crop, mean/std); a PNG is written "
            "per image with the Grad-CAM heat map of the explained class over the crop, the box around its "
            "hottest region, and the top-k labels. --filters draws the first conv layer's filters and "
            "--feature-maps one layer's activations. Unreadable images are reported and skipped.", width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files, folders (searched recursively) or quoted glob patterns")
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run folder (best, else last checkpoint) or a "
                   ".safetensors checkpoint saved with its preprocessing")
    p.add_argument("--layer", metavar="L", help="layer to explain at (default: the deepest conv ReLU with a "
                   "4x4 or finer map, relu5_3 on VGG-16 at 224 px)")
    p.add_argument("--class", dest="target", metavar="K",
                   help="class to explain for every image, by index or name (default: each image's top-1)")
    p.add_argument("--topk", type=int, default=3, metavar="K", help="labels shown in each title (default: 3)")
    p.add_argument("--out", default="explain", metavar="DIR", help="output folder (default: ./explain)")
    p.add_argument("--box", type=float, default=0.5, metavar="F",
                   help="draw the box around the largest region above F x the map's peak; 0 for none (default: 0.5)")
    p.add_argument("--filters", action="store_true", help="also write filters.png (no image needed)")
    p.add_argument("--feature-maps", metavar="LAYER", help="also write each image's activation maps at LAYER")
    p.add_argument("--max-maps", type=int, default=64, metavar="N",
                   help="most feature maps per grid; the most active are kept (default: 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr: a bar on a terminal (by default only for over 4 images), otherwise "
                   "(a log, a pipe) a line every 30 s with the time left (by default from 30 s into the run, with "
                   "--progress from its start); --no-progress: neither")
    p.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> None:
    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1, got {args.topk}")
    if args.max_maps < 1:
        raise UsageError(f"--max-maps must be at least 1, got {args.max_maps}")
    if not 0 <= args.box <= 1:
        raise UsageError(f"--box must be in [0, 1] (0: no box), got {args.box}")
    if not args.images and not args.filters:
        raise UsageError("nothing to do: give images to explain, or --filters")


def _load(ckpt: str) -> tuple[Any, Any]:
    from vggnet.infer.predictor import Preprocessing
    from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    return model, Preprocessing.from_meta(checkpoint_meta(file, model, extra))


def parse_class(text: str | None, prep: Any) -> int | None:
    """A class index from a name (as the checkpoint records them) or a number, checked against the model."""
    if text is None:
        return None
    names = list(prep.classes or [])
    if text in names:
        return names.index(text)
    try:
        index = int(text)
    except ValueError:
        known = f"; class names: {', '.join(names)}" if names else ""
        raise UsageError(f"--class {text!r} is neither a class index nor a class name{known}") from None
    if not 0 <= index < prep.num_classes:
        raise UsageError(f"--class {index} is out of range: the model has {prep.num_classes} classes "
                         f"(0..{prep.num_classes - 1})")
    return index


def output_stems(paths: list[Path]) -> list[str]:
    """One file stem per image, in order; a repeated stem gets -2, -3... so no image's output overwrites
    another's from the same run, whatever the order the files fail or succeed in."""
    taken: set[str] = set()
    stems = []
    for path in paths:
        stem = candidate = path.stem or "image"
        count = 1
        while candidate in taken:
            count += 1
            candidate = f"{stem}-{count}"
        taken.add(candidate)
        stems.append(candidate)
    return stems


def explain_image(model: Any, prep: Any, image: Any, stem: str, args: argparse.Namespace, layer: str,
                  target: int | None, feature_layer: str | None) -> tuple[list[Path], str]:
    """Write one image's PNGs; returns them and a one-line summary of what was explained."""
    from vggnet.explain import (
        grad_cam_raw,
        no_evidence,
        no_evidence_text,
        save_feature_maps,
        save_overlay,
        to_display,
        upsample_cam,
    )
    from vggnet.infer.predictor import preprocess

    x = preprocess([image], prep)
    result = grad_cam_raw(model, x, layer, target)
    cam = upsample_cam(result.maps, x.shape[-2:])[0].cpu()
    probs = result.logits[0].float().softmax(0).cpu()
    values, indices = probs.topk(min(args.topk, probs.numel()))
    top = [(prep.label(int(i)), float(v)) for v, i in zip(values, indices, strict=True)]
    explained = int(result.targets[0])
    label = f"{prep.label(explained)} ({100 * float(probs[explained]):.1f}%)"
    out = Path(args.out)
    written = [save_overlay(out / f"{stem}.gradcam.png", to_display(x[0], prep.mean, prep.std), cam, top=top,
                            explained=label, layer=result.layer, box_fraction=args.box or None)]
    if feature_layer:
        written.append(save_feature_maps(model, x, feature_layer, out / f"{stem}.{feature_layer}.png",
                                          args.max_maps, source=stem))
    summary = f"class {label}"
    if no_evidence(cam):  # the overlay is blank: say so here too, not only in the picture
        summary += f"; {no_evidence_text(prep.label(explained), result.layer)} (blank map)"
    return written, summary


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import vggnet.progress as vprogress
    from vggnet.explain import default_cam_layer, save_filter_grid, spatial_layers
    from vggnet.infer.images import ImageLoadError, expand_image_paths, iter_images

    _check_options(args)
    paths = expand_image_paths(args.images) if args.images else []  # a typo fails before the model loads
    model, prep = _load(args.ckpt)
    layer = model.resolve_layer(args.layer) if args.layer else default_cam_layer(model, prep.image_size)
    feature_layer = model.resolve_layer(args.feature_maps) if args.feature_maps else None
    for name, option in ((layer, "--layer"), (feature_layer, "--feature-maps")):
        if name is not None and name not in spatial_layers(model):
            raise UsageError(f"{option} {name}: a vector per image, not a grid of positions; choose one of: "
                             f"{', '.join(spatial_layers(model))}")
    target = parse_class(args.target, prep)
    model = model.to(torch.device(args.device or "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.filters:
        print(f"filters -> {save_filter_grid(model, out / 'filters.png')}")
    tty = sys.stderr.isatty()  # off a terminal: lines, by default the first after LOG_INTERVAL_S (a quick run: none)
    show = args.progress if args.progress is not None else (None if not tty or len(paths) > 4 else False)
    explained = skipped = 0
    images = iter_images(paths, skip_unreadable=True)
    for (path, image), stem in vprogress.progress_bar(zip(images, output_stems(paths), strict=True), total=len(paths),
                                                      desc="explain", unit="img", progress=show):
        if isinstance(image, ImageLoadError):
            skipped += 1
            tqdm.write(f"vggnet explain: skipped {path}: {image.reason}", file=sys.stderr)
            continue
        written, summary = explain_image(model, prep, image, stem, args, layer, target, feature_layer)
        explained += 1
        tqdm.write(f"{path} -> {', '.join(map(str, written))}  [{summary}]", file=sys.stdout)
    if skipped:
        print(f"vggnet explain: {skipped} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if skipped else 0  # as predict: a partial result is written, and the status says it is partial
