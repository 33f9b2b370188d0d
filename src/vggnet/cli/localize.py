"""``vggnet localize train|eval|predict``: box regression, the paper's Appendix A, on VOC-style data."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from vggnet.atomic import write_json
from vggnet.errors import UsageError

EPILOG = """\
data:
  A folder in PASCAL VOC layout: annotations/*.xml (or Annotations/, annots/, annot/, annotation/, xml/,
  xmls/, any case, or the XML files themselves) and the images they name (images/, JPEGImages/ or beside
  the XML). Every image is decoded once when the folder is read: a missing, truncated or unreadable one is
  skipped with one line naming it. A box reaching past the image is clipped, one wholly outside dropped
  (the image's other boxes stay), each with a note. The main object of an image is its largest
  non-difficult one; a prediction is correct when its IoU with any object of that class is >= 0.5.
  The train/val split is fixed by --val and --seed and recorded in the run.

test protocols (eval, predict):
  whole   the image resized to S x S: one box
  centre  the paper's first protocol: shorter side to S, the central S x S crop: one box
  dense   the paper's second: every S x S window (stride S/4) at each scale (shorter side = scales x S),
          one box per window, merged: greedy IoU >= 0.5 clusters of the boxes, visited by score; the
          heaviest cluster's score-weighted mean wins. Training crops cut objects and teach the net to box
          the visible part, so a window's score drops 20x for each side of its box that stops at a window
          edge inside the image (the object probably goes on beyond what that window saw).

examples:
  vggnet data prepare ../shared/data/raccoon-voc.tar.gz --out data/raccoon
  vggnet localize train --data data/raccoon --weights runs/cifar10 --out runs/raccoon-scr
  vggnet localize eval --ckpt runs/raccoon-scr --data data/raccoon --protocol all
  vggnet localize predict --ckpt runs/raccoon-scr data/raccoon/images/raccoon-1*.jpg --out boxes/
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "localize", help="box regression (the paper's Appendix A): train, evaluate, draw boxes",
        description=textwrap.fill(
            "Fine-tune a VGG whose last layer predicts a bounding box — one box shared by all classes (SCR) or "
            "one per class (PCR) — with the paper's Euclidean loss on (centre, width, height), then test it with "
            "a single view or densely over several scales, against baselines that look at no pixel.", width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = actions.add_parser("train", help="fine-tune a box regressor", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", required=True, help="VOC-style folder (annotations/*.xml and images)")
    t.add_argument("--out", required=True, help="run folder to create (best.safetensors, metrics.json, curves)")
    t.add_argument("--recipe", help="YAML of settings (default: the built-in vggnet/localize/localize.yaml)")
    t.add_argument("--weights", help="classification checkpoint or run folder (vggnet, torchvision, timm) to start "
                   "from; its architecture and normalisation are used")
    t.add_argument("--model", help="configuration without --weights (e.g. vgg11_bn)")
    t.add_argument("--width", type=float, help="channel width multiplier without --weights")
    t.add_argument("--per-class", dest="per_class", action="store_true", default=None,
                   help="per-class regression (PCR: 4 outputs per class) instead of one shared box (SCR)")
    t.add_argument("--loss", choices=("l2", "smooth_l1"), help="l2 (the paper's Euclidean loss) or smooth_l1")
    t.add_argument("--finetune", choices=("all", "fc"), help="fine-tune all layers or the FC layers only")
    t.add_argument("--image-size", type=int, help="S, the training crop (default 96)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--val", type=int, help="images held out by the fixed-seed split (default 40)")
    t.add_argument("--force", action="store_true", help="replace an existing run folder")
    t.set_defaults(func=run_train)

    e = actions.add_parser("eval", help="accuracy at IoU 0.5 and mean IoU on the held-out images, with baselines",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--ckpt", required=True, help="run folder or checkpoint from `vggnet localize train`")
    e.add_argument("--data", required=True, help="the VOC-style folder (its held-out split is scored)")
    e.add_argument("--protocol", choices=("whole", "centre", "dense", "all"), default="all")
    e.add_argument("--scales", type=float, nargs="+", help="dense scales as multiples of S (default: the run's)")
    e.add_argument("--split", choices=("val", "all"), default="val", help="the run's held-out images, or every image")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--out", help="also write the report (JSON) here")
    e.set_defaults(func=run_eval)

    r = actions.add_parser("predict", help="draw predicted (red) and, when annotated, true (green) boxes as PNG, "
                           "with a legend",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--ckpt", required=True, help="run folder or checkpoint from `vggnet localize train`")
    r.add_argument("images", nargs="+", help="image files, folders or globs")
    r.add_argument("--out", required=True, help="folder for the PNGs")
    r.add_argument("--protocol", choices=("whole", "centre", "dense"), default="whole",
                   help="test view (default: whole, the best protocol in benchmarks/localize.md)")
    r.add_argument("--annotations", help="folder of VOC XML named like the images: true boxes drawn in green")
    r.add_argument("--class", dest="label", help="PCR checkpoints: the class whose box to draw (default: the "
                   "annotated main class, else the first)")
    r.set_defaults(func=run_predict)


def _settings(args: argparse.Namespace) -> Any:
    import importlib.resources

    from vggnet.engine.recipe import parse_yaml  # 1e-3 is a number, as in training recipes
    from vggnet.localize.train import LocalizeSettings

    text = Path(args.recipe).read_text() if args.recipe else \
        (importlib.resources.files("vggnet.localize") / "localize.yaml").read_text()
    data = parse_yaml(text) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{args.recipe or 'localize.yaml'}: expected a mapping of settings")
    overrides = {"weights": args.weights, "model": args.model, "width": args.width, "per_class": args.per_class,
                 "loss": args.loss, "finetune": args.finetune, "image_size": args.image_size, "epochs": args.epochs,
                 "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "val": args.val}
    data.update({k: v for k, v in overrides.items() if v is not None})
    settings = LocalizeSettings.from_dict(data)
    settings.check()
    return settings


def _load_data(folder: str) -> tuple[list, list[str]]:
    from vggnet.cli.data import print_voc_load
    from vggnet.data import DataError
    from vggnet.data.voc import class_names, load_voc_folder

    annotations, skipped = load_voc_folder(folder)
    print_voc_load(annotations, skipped)
    if not annotations:
        raise DataError(f"{folder}: no usable annotated image")
    return annotations, class_names(annotations)


def run_train(args: argparse.Namespace) -> int:
    import shutil

    from vggnet.data.voc import split_annotations
    from vggnet.localize.train import train_localizer

    settings = _settings(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise UsageError(f"{out} exists and is not empty; choose another --out or pass --force")
        shutil.rmtree(out)
    annotations, classes = _load_data(args.data)
    train, val = split_annotations(annotations, settings.val, settings.seed)
    print(f"{len(train)} training / {len(val)} held-out images, classes {classes}, "
          f"{'PCR' if settings.per_class else 'SCR'}, {settings.loss} loss, fine-tune {settings.finetune}",
          file=sys.stderr)
    path = train_localizer(settings, train, classes, out, val, data=str(args.data),
                           log=lambda line: print(line, file=sys.stderr))
    print(path)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from vggnet.localize.runs import evaluate_run

    annotations, _ = _load_data(args.data)
    report = evaluate_run(args.ckpt, annotations,
                          ["whole", "centre", "dense"] if args.protocol == "all" else [args.protocol],
                          scales=args.scales, split=args.split, progress=None,
                          log=lambda line: print(line, file=sys.stderr))
    if args.out:
        write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['images']} images ({report['split']}), checkpoint {report['checkpoint']}\n")
    print("| predictor | acc @ IoU 0.5 | mean IoU |\n|---|---|---|")
    for name, row in report["rows"].items():
        print(f"| {name} | {100 * row['acc_iou50']:.1f} % | {row['mean_iou']:.3f} |")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from vggnet.localize.runs import predict_files

    written, failed = predict_files(args.ckpt, args.images, Path(args.out), args.protocol, args.annotations,
                                    args.label, log=lambda line: print(line, file=sys.stderr))
    for path in written:
        print(path)
    return 0 if written else 1 if failed else 2
