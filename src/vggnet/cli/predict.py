"""``vggnet predict``: top-k labels for image files, folders or globs, from a checkpoint or an exported model."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from vggnet.cli.ray_engine import RAY_EPILOG
from vggnet.cli.ray_engine import add_arguments as add_engine_arguments
from vggnet.errors import UsageError

EPILOG = """\
runtimes (--runtime; all return the same labels up to their precision):
  eager           fp32 as trained (default); the only one that takes --device cuda and --precision
  channels_last   fp32, batch norm folded, NHWC memory layout
  bf16            bf16 weights and autocast (fast on CPUs with AVX512-BF16 or AMX)
  compile         torch.compile (Inductor), fp32; compiles on the first batch
  compile-bf16    torch.compile with bf16 weights and activations
  int8            static INT8 (torchao PT2E, X86InductorQuantizer); calibrated (see below)
  int8-dynamic    INT8 FC layers with per-batch activation scales (torchao), convs fp32
  onnx            ONNX Runtime, fp32
  onnx-int8       ONNX Runtime static INT8 (QDQ); calibrated (see below)
  openvino        OpenVINO CPU plugin in its default precision: bf16 on CPUs with AVX512-BF16 or AMX, else
                  fp32 (the openvino extra: pip install 'vggnet[openvino]')
  openvino-int8   OpenVINO, INT8 by NNCF post-training quantization; calibrated (see below)
  auto            tries them on the calibration images, keeps the fastest whose top-1 agrees with eager
                  on >= 99 % of them, says which on stderr; calibrated (see below)

calibration images (int8, onnx-int8, openvino-int8, auto; the rule of vggnet serve and vggnet export's INT8 formats):
  --calib-data PATH (a folder, glob or file of training images) when given; else the training split of the
  run --ckpt belongs to, rebuilt from its recipe.yaml as vggnet eval does (the embedded digits for the demo,
  the ImageFolder tree it names...; never its validation split); else an error: a checkpoint outside a run
  folder needs --calib-data. --calib-n of them (default 64), spread evenly; one line on stderr says which.

--ckpt may also be a file written by `vggnet export` (.onnx, .pt2, .pt, .pte, .tflite): it runs as exported,
on the CPU, with the preprocessing stored inside it, and --runtime, --device and --precision do not apply.
A .pte runs in ExecuTorch's runtime, a .tflite in LiteRT's interpreter (the edge extra: pip install
'vggnet[edge]'), an INT8 one (executorch-int8, tflite-int8) as well.

devices (--device, --precision; the eager runtime of a checkpoint):
  cpu (default), cuda, cuda:N; fp32 (default), bf16, fp16 (CUDA only) or auto (bf16 where the hardware runs
  it natively, fp16 on GPUs without bf16, else fp32) as autocast. A CUDA device that is not there, fp16 on
  the CPU, or a device for another runtime or an exported file is an error before anything loads.

examples:
  vggnet predict --ckpt runs/cifar10 photo.jpg
  vggnet predict --ckpt runs/cifar10 --topk 3 --json 'shots/**/*.png' > labels.json
  vggnet predict --ckpt runs/demo --runtime int8 shots/     # calibrated on the run's own training split
  vggnet predict --ckpt runs/cifar10 --runtime int8 --calib-data data/cifar10/train --calib-n 256 shots/
  vggnet predict --ckpt model.onnx shots/
  vggnet predict --ckpt model.int8.tflite shots/
  vggnet predict --ckpt runs/cifar10 --device cuda --precision bf16 shots/
  vggnet predict --ckpt runs/cifar10 --engine ray --concurrency 4 --out labels.parquet shots/
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="top-k labels for images (files, folders, globs) from a checkpoint or exported model",
        description=textwrap.fill(
            "Classify images with a trained checkpoint: each image is resized (shorter side to the checkpoint's "
            "test scale: the view it was validated at, else the training crop), centre-cropped to the training "
            "crop and normalised exactly as the checkpoint records, then run in batches through the "
            "chosen runtime. Prints one line per image with the top-k labels and probabilities, or JSON. "
            "Folders are searched recursively for image files; quote globs so that vggnet expands them "
            "(** matches sub-folders). An unreadable, truncated or oversized image is an error naming the "
            "file (or, with --skip-unreadable, a reported failure).", width=100),
        epilog=EPILOG + "\n" + RAY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders or glob patterns (with --engine ray also s3:// / gs:// / file:// URIs)")
    p.add_argument("--ckpt", required=True, metavar="RUN",
                   help="run folder (best.safetensors, else last.safetensors), .safetensors checkpoint, or a file "
                   "from `vggnet export`")
    p.add_argument("--runtime", default=None, metavar="R",
                   help="eager, channels_last, bf16, compile, compile-bf16, int8, int8-dynamic, onnx, onnx-int8, "
                   "openvino, openvino-int8 or auto (default: eager)")
    p.add_argument("--device", metavar="D", help="cpu (default), cuda or cuda:N: where the eager runtime runs")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast of the eager runtime: fp32 (default), bf16, fp16 (CUDA only) or auto")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="labels per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images decoded and run per forward pass (default: 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--calib-data", metavar="PATH",
                   help="calibration images for int8, onnx-int8, openvino-int8 and auto: a folder (e.g. the training "
                   "set), glob or file; use training images, not the ones being predicted (default: the training split "
                   "of --ckpt's run, from its recipe.yaml; needed for a checkpoint outside a run folder)")
    p.add_argument("--calib-n", type=int, default=64, metavar="N",
                   help="calibration images, spread evenly over --calib-data or the run's training split "
                   "(default: 64)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="report unreadable images and go on, instead of stopping at the first one")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr: a bar on a terminal (by default only for more than --batch-size "
                   "images), otherwise (a log, a pipe) a line every 30 s with the time left (by default from 30 s "
                   "into the run, with --progress from its start); --no-progress: neither")
    p.add_argument("--out", metavar="F.parquet",
                   help="also write the predictions to this Parquet file (path, error, top-k labels, indices and "
                   "probabilities), replaced only when complete")
    add_engine_arguments(p)
    p.set_defaults(func=run)


_CALIBRATED = ("int8", "onnx-int8", "openvino-int8", "auto")
_EXPORT_SUFFIXES = (".onnx", ".pt2", ".pt", ".ts", ".torchscript", ".jit", ".pte", ".tflite")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # vggnet.hardware.PRECISIONS, without importing torch for --help


def check_device(args: argparse.Namespace) -> str:
    """--device / --precision checked before anything is loaded (vggnet.hardware's rules, as in `vggnet eval`);
    the device the predictions run on."""
    from vggnet.infer.predictor import check_cpu_only, placement

    ckpt = Path(args.ckpt)
    if ckpt.suffix.lower() in _EXPORT_SUFFIXES:
        check_cpu_only(f"an exported file ({ckpt.name})", args.device, args.precision)
        return "cpu"
    runtime = args.runtime or "eager"
    if runtime != "eager":
        check_cpu_only(f"--runtime {runtime}", args.device, args.precision)
        return "cpu"
    return str(placement(args.device, args.precision)[0])


def _calibration_source(args: argparse.Namespace, file: Path, runtime: str) -> Any:
    """Where a calibrated runtime's images come from (vggnet.capture.calibration's one rule: --calib-data, else the
    run's training split, else a one-line error), decided before the model loads; None when nothing needs them."""
    from vggnet.infer import find_calibration

    if runtime not in _CALIBRATED and not args.calib_data:
        return None
    if args.calib_n < 1:
        raise UsageError(f"--calib-n must be at least 1, got {args.calib_n}")
    return find_calibration(file, args.calib_data, needed_by=f"--runtime {runtime}")


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    """The predictor and the name of what it runs."""
    from vggnet.export import load_exported
    from vggnet.infer import Predictor, Preprocessing, read_calibration
    from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

    ckpt = Path(args.ckpt)
    if ckpt.suffix.lower() in _EXPORT_SUFFIXES:
        if args.runtime not in (None, "eager"):
            raise UsageError(f"--runtime {args.runtime} applies to checkpoints; {ckpt} runs as exported")
        exported = load_exported(ckpt)
        return exported.predictor(max_batch=args.batch_size), f"exported {exported.format}"
    runtime = args.runtime or "eager"
    file = checkpoint_file(ckpt)  # errors for a missing or foreign checkpoint come before any image work
    source = _calibration_source(args, file, runtime)
    model, extra = load_checkpoint(file)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    calib = None if source is None else read_calibration(source, args.calib_n, prep)
    if calib is not None and runtime in _CALIBRATED:
        print(f"vggnet predict: calibrating {runtime} on {len(calib)} images of {source.description}",
              file=sys.stderr)
    predictor = Predictor(model, prep, runtime, calib=calib, max_batch=args.batch_size, device=args.device,
                          precision=args.precision)
    predictor.source = file
    return predictor, predictor.runtime.name


def _table(rows: list[dict[str, Any]], topk: int) -> str:
    width = max(len(r["image"]) for r in rows)
    header = f"{'image':<{width}}  " + "  ".join(f"top-{k + 1}" for k in range(topk))
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['image']:<{width}}  ERROR: {r['error']}")
        else:
            lines.append(f"{r['image']:<{width}}  " + "  ".join(
                f"{t['label']} {100 * t['probability']:.1f}%" for t in r["top"]))
    return "\n".join(lines)


def _progress(args: argparse.Namespace, images: int) -> Any:
    """The images' progress: a bar on a terminal (by default only when there are many), lines elsewhere; off a
    terminal the first line comes after ``LOG_INTERVAL_S`` unless --progress asks, so a quick run prints nothing
    extra."""
    import vggnet.progress as vprogress

    tty = sys.stderr.isatty()
    show = args.progress if args.progress is not None else (None if not tty or images > args.batch_size else False)
    return vprogress.progress_bar(total=images, desc="predict", unit="img", progress=show)


def _local_rows(args: argparse.Namespace, predictor: Any, paths: list[Path], topk: int) -> list[dict[str, Any]]:
    """The rows of --engine local: this process, --batch-size images per forward pass."""
    from vggnet.infer import ImageLoadError, preprocess
    from vggnet.infer.images import iter_images

    rows: list[dict[str, Any]] = []
    images = iter_images(paths, skip_unreadable=args.skip_unreadable)
    with _progress(args, len(paths)) as bar:
        while True:
            batch = [next(images, None) for _ in range(args.batch_size)]
            batch = [item for item in batch if item is not None]
            if not batch:
                break
            good = [(path, image) for path, image in batch if not isinstance(image, ImageLoadError)]
            results: dict[Path, dict[str, Any]] = {}
            if good:
                probs = predictor.logits(preprocess([image for _, image in good], predictor.prep)).softmax(1)
                values, indices = probs.topk(topk, dim=1)
                for (path, _), vs, ids in zip(good, values.tolist(), indices.tolist(), strict=True):
                    results[path] = {"image": str(path), "top": [
                        {"label": predictor.prep.label(i), "index": i, "probability": v} for v, i in zip(vs, ids,
                                                                                                        strict=True)]}
            for path, image in batch:
                rows.append(results.get(path) or {"image": str(path), "error": getattr(image, "reason", str(image))})
            bar.update(len(batch))
    return rows


def _image_inputs(args: argparse.Namespace) -> list[Any]:
    """The images to predict: files, folders and globs expanded here; URIs (--engine ray) listed by Ray's readers."""
    from vggnet.infer import expand_image_paths

    if args.engine == "ray" and any("://" in spec for spec in args.images):
        return list(args.images)
    return expand_image_paths(args.images)


def run(args: argparse.Namespace) -> int:
    from vggnet.cli.ray_engine import check as check_engine

    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1, got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = check_device(args)
    check_engine(args)
    paths = _image_inputs(args)  # a typo fails before the model is loaded
    predictor, runtime = _load(args)
    if hasattr(predictor.runtime, "summary"):  # auto: say what was measured and picked
        print(f"runtime auto picked {predictor.runtime.chosen.name}:\n{predictor.runtime.summary()}", file=sys.stderr)
    topk = min(args.topk, predictor.prep.num_classes)
    if args.engine == "ray":
        from vggnet.cli.ray_engine import predict_rows

        rows = predict_rows(args, predictor, paths, topk)
    else:
        rows = _local_rows(args, predictor, paths, topk)
    if args.out:
        from vggnet.infer.raydata import write_predictions

        write_predictions(rows, args.out)
    failed = sum("error" in r for r in rows)
    if args.json:
        print(json.dumps({"checkpoint": str(predictor.source), "runtime": runtime, "device": device,
                          "precision": args.precision or "fp32", "topk": topk, "image_size": predictor.prep.image_size,
                          "test_scale": predictor.prep.test_scale, "predictions": rows, "failed": failed}, indent=2))
    else:
        print(_table(rows, topk))
    if failed:
        print(f"vggnet predict: {failed} of {len(rows)} images could not be read", file=sys.stderr)
    return 1 if failed else 0
