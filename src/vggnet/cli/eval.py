"""``vggnet eval``: the paper's test-time protocols on one checkpoint or an ensemble."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from vggnet.atomic import write_json, write_text
from vggnet.errors import UsageError

PROTOCOL_HELP = """\
protocols (one --protocol per table row; all rows use the same images):
  KIND[@SCALE,SCALE,...][:flip|:noflip]

  KIND  single           shorter side -> Q, centre crop of the training crop size, one forward pass
        shift            small-image TTA (not in the paper): the centre crop and the same crop moved
                         2 px along both diagonals (edges reflect-padded) x 2 flips = 10 views
        dense            the whole rescaled image through the network made fully convolutional (the fc
                         head becomes the conv head, same weights; score map averaged), plus its mirror;
                         sides are first trimmed to a multiple of 32 px around the centre (pool stride)
        multicrop        a 5x5 grid of crops of the training crop size (corners included) x 2 flips
                         = 50 crops per scale
        dense+multicrop  the average of the dense and multicrop softmaxes (the paper's Table 5)
  SCALE test scale Q, the shorter side after isotropic rescaling. Several scales = multi-scale
        evaluation (softmax averaged over scales). Default: 1.0.
        A value below 16 is RELATIVE to the checkpoint's training crop (its image_size metadata);
        an integer of 16 or more is PIXELS. At crop 224, 1.0 is 224 px and the paper's
        Q in {256, 384, 512} is 1.143,1.714,2.286 (or simply 256,384,512); its {S-32, S, S+32} at
        S = 256 is 1.0,1.143,1.286. At crop 32 (CIFAR, the digits demo) 1.0 is 32 px, 1.5 is 48 px.
        single, shift and multicrop need Q >= the crop; dense takes any Q >= 32 px.
  :flip / :noflip  add / drop the horizontally flipped views (default: off for single, on otherwise)

  softmax probabilities are averaged over views, scales, the two parts of dense+multicrop and the
  models of an ensemble (several --ckpt); errors are top-1 / top-5 in percent.

  Before the first image, stderr gets each protocol's views per image, its forward passes and a time
  estimated from one timed batch: multicrop@1.14,1.5 is 100 views an image. --limit N tries N images first.

examples:
  vggnet eval --ckpt runs/demo                                 # single centre crop at Q = crop
  vggnet eval --ckpt runs/demo --protocol single --protocol dense@1.0,1.25,1.5 --protocol multicrop@1.0,1.5
  vggnet eval --ckpt runs/cifar10 --data data/cifar10 --protocol single:flip --out runs/cifar10/eval
  vggnet eval --ckpt runs/D --ckpt runs/E --data /imagenet --protocol dense+multicrop@256,384,512
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="test-time evaluation: single crop, dense, multi-crop, multi-scale, ensembles (the paper's Sec. 4)",
        description=textwrap.fill(
            "Evaluate one checkpoint, or an ensemble of several, on a run's validation split with the "
            "paper's test-time protocols. A --ckpt is a run folder (best.safetensors, else last.safetensors) "
            "or a .safetensors file; the run's recipe.yaml makes the split the same as in training. Prints a "
            "Markdown table (top-1/top-5 error, images, seconds); --out also writes eval.json (with per-class "
            "accuracy and the confusion matrix), eval.md and confusion.png (first protocol).", width=100),
        epilog=PROTOCOL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", action="append", required=True, metavar="RUN",
                   help="run folder or .safetensors checkpoint; repeat for an ensemble")
    p.add_argument("--data", help="ImageFolder tree (default: the run's recipe data, e.g. the embedded digits)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split (default: val)")
    p.add_argument("--protocol", action="append", metavar="P",
                   help="protocol, e.g. single, dense@1.0,1.5, multicrop@256,384,512 (repeatable; default: single "
                        "at the checkpoint's own test scale, the view it was validated at in training)")
    p.add_argument("--batch-size", type=int, default=64, help="network inputs per forward pass (default: 64)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="evaluate only N images, evenly spread over the split (the cost printed on stderr before "
                        "the start, views per image and an estimated time, suggests an N when it is long)")
    p.add_argument("--out", help="folder for eval.json, eval.md and confusion.png")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of the table")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the hardware runs it natively)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr: a bar on a terminal, otherwise (a log, a pipe) a line every 30 s with the "
                   "time left (by default from 30 s into each protocol, with --progress from its start); "
                   "--no-progress: neither")
    p.set_defaults(func=run)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    k = rows[0]["top5_k"] if rows else 5
    lines = [f"| protocol | top-1 err (%) | top-{k} err (%) | n | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {_fmt(r['top1_err'])} | {_fmt(r['top5_err'])} | {r['n']} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def _cost(args: argparse.Namespace, protocols: list[Any], models: list[Any], meta: dict[str, Any], images: int,
          device: str) -> str:
    """The block said before the first image is read: views per image, an estimated time, and --limit.

    Protocols that cannot run at this crop are refused first, so an error stays the only line printed."""
    from vggnet.evaluate.cost import cost_block, seconds_per_crop
    from vggnet.evaluate.protocols import check_scales
    from vggnet.hardware import native_bf16

    crop = meta["image_size"]
    for protocol in protocols:
        check_scales(protocol, crop)
    bf16 = native_bf16(device) if args.bf16 is None else args.bf16
    per_crop = seconds_per_crop(models, crop, len(meta["mean"]), device=device, bf16=bf16,
                                batch_size=args.batch_size) if images else None
    return cost_block(protocols, crop, images, per_crop, args.limit, len(models), device)


def run(args: argparse.Namespace) -> int:
    from vggnet.evaluate import eval_images, load_models, parse_protocol, predict_proba, summarize
    from vggnet.evaluate.protocols import Protocol
    from vggnet.hardware import resolve_device

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    protocols = [parse_protocol(text) for text in args.protocol or []]  # fail before any loading
    device = str(resolve_device(args.device))  # likewise a CUDA device that is not there
    models, meta = load_models(args.ckpt)
    if not protocols:  # the view predict, serve and export use: a jittered run is validated above the crop
        scales = sorted({q or meta["image_size"] for q in meta["test_scales"]})
        if len(scales) > 1:
            raise UsageError(f"the ensemble's members were validated at different test scales ({scales} px): "
                             "choose one with --protocol, e.g. --protocol single@" + str(scales[0]))
        scale = scales[0]
        protocols = [Protocol("single", (1.0,) if scale == meta["image_size"] else (int(scale),))]
    images, labels, classes = eval_images(args.ckpt[0], args.data, args.split, classes=meta["classes"],
                                          limit=args.limit)
    crop = meta["image_size"]
    print(_cost(args, protocols, models, meta, len(images), device), file=sys.stderr)
    results = []
    for protocol in protocols:
        start = time.perf_counter()
        probs = predict_proba(models, images, protocol, crop=crop, mean=meta["mean"], std=meta["std"],
                              batch_size=args.batch_size, device=device, amp_bf16=args.bf16,
                              progress=args.progress)
        seconds = time.perf_counter() - start
        metrics = summarize(probs, labels, classes)
        results.append({"protocol": str(protocol), "scales_px": list(protocol.pixel_scales(crop)),
                        "views_per_image": protocol.views_per_image(), "seconds": seconds,
                        **metrics})
    report = {
        "checkpoints": meta["checkpoints"], "models": meta["models"], "data": str(args.data or "recipe"),
        "split": args.split, "limit": args.limit, "image_size": crop, "mean": meta["mean"], "std": meta["std"],
        "classes": classes, "device": device, "results": results,
    }
    table = markdown_table(results)
    print(json.dumps(report, indent=2) if args.json else table)
    if args.out:
        from vggnet.plots import plot_confusion

        out = Path(args.out)
        write_json(out / "eval.json", report)
        ensemble = " + ".join(meta["checkpoints"])
        header = f"# vggnet eval\n\ncheckpoint(s): {ensemble}  \ndata: {report['data']} ({args.split}"
        header += f", {args.limit} images evenly spread)" if args.limit else ")"
        write_text(out / "eval.md", f"{header}\n\n{table}\n")
        first = results[0]
        plot_confusion(first["confusion"], classes, out / "confusion.png", title=f"{first['protocol']}: "
                       f"top-1 err {_fmt(first['top1_err'])}%")
    return 0
