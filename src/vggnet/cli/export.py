"""``vggnet export``: a checkpoint as ONNX, an AOTInductor ``.pt2`` package, TorchScript, an ExecuTorch ``.pte``
program or a LiteRT ``.tflite`` model, fp32 or INT8, checked against eager."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from vggnet.errors import UsageError

EPILOG = """\
formats:
  onnx         dynamo exporter, dynamic batch dimension ("batch"), checked with onnx.checker and run with
               ONNX Runtime; input "input" (N x C x S x S float32, normalised), output "logits".
               Metadata: metadata_props "vggnet" (JSON) plus "mean", "std", "image_size", "in_channels",
               "classes" (each JSON).
  onnx-int8    the onnx export quantized by ONNX Runtime: static INT8, QDQ format, weights int8 per output
               channel, activations uint8 per tensor, calibrated at export time. About 1/4 of the fp32 file;
               runs in ONNX Runtime (and vggnet predict / load_exported) without calibration data. Same
               input, output and metadata as onnx, plus "quantization" (JSON: scheme, tool, calibration
               source and image count), also inside "vggnet".
  pt2          torch.export with a dynamic batch, compiled by AOTInductor (needs a C++ compiler; minutes for
               VGG-16). Load with torch._inductor.aoti_load_package(path); metadata in
               compiled.get_metadata()["vggnet"].
  pt2-int8     torchao PT2E static INT8 (X86InductorQuantizer: the int8 runtime's scheme), compiled by
               AOTInductor into oneDNN int8 kernels; needs torchao to export (not to load) and an x86 CPU.
               Loads like pt2, without calibration data; "quantization" inside the "vggnet" metadata.
  torchscript  torch.jit.trace (deprecated upstream; for libtorch consumers). Metadata in the extra file
               "vggnet.json" (torch.jit.load(path, _extra_files={"vggnet.json": ""})).
  executorch   ExecuTorch program (.pte) for phones and edge devices, XNNPACK delegate, fp32; dynamic batch
               from 1 to --max-batch (default 32: its memory is planned for that batch when it loads;
               vggnet predict runs larger batches in slices). Needs the edge extra (pip install
               'vggnet[edge]'). Metadata: the constant method "vggnet_metadata" (JSON text).
  executorch-int8
               the same, torchao PT2E static INT8 (XNNPACKQuantizer: weights int8 symmetric per output
               channel, activations int8 per tensor), calibrated now; float32 in and out.
  tflite       LiteRT (TensorFlow Lite's current name) model converted by litert-torch, fp32, written at
               batch 1 (litert-torch 0.10 converts no dynamic batch of a VGG) and resized at run time
               (interpreter.resize_tensor_input + allocate_tensors; vggnet predict does it for every batch).
               The gap head resizes; the fc and conv heads come out with the batch of 1 fixed in a
               reshape, so the export tries it, records "litert": {"resizable": false} in the metadata,
               and vggnet predict runs such a file one image at a time.
               Writing needs the LiteRT converter: make edge-convert (its dependency pins clash with the
               project's, so it is no extra); running needs only the edge extra (ai-edge-litert).
               Metadata: the flatbuffer's Model.metadata entry "vggnet" (JSON text).
  tflite-int8  the same, torchao PT2E static INT8 (litert-torch's PT2EQuantizer, the scheme above),
               calibrated now; its input and output tensors are int8 (scale and zero point in the file's
               tensor details), quantized and dequantized by vggnet predict.

Every file is loaded back and checked against the eager fp32 model before it is kept. fp32 formats run at
batch 1, 3 and 8: max |exported - eager| / max |eager| must be <= 1e-4 (onnx, pt2, executorch, tflite) or 1e-5
(torchscript). The mobile formats are checked in their own runtimes: ExecuTorch's Python runtime and
LiteRT's interpreter (ai-edge-litert).
INT8 cannot meet that: its top-1 class must agree with eager on >= --min-agreement (default 0.98) of up to
--check-images (default 256; at least 64 unless fewer are asked for) held-out images, run as one batch of
1, one of 3, then batches of 8, the last holding what is left (4 images when 256 or 64 are checked), so
the report names each size run (by default batch 1, 3, 8 and 4); the max relative logit error is
reported, not bounded. Read a file back in Python with vggnet.export.load_exported(path), or predict with it:
vggnet predict --ckpt model.onnx IMAGE.

INT8 calibration images (the same rule as vggnet predict and vggnet serve with --runtime int8, onnx-int8
or auto): --calib-data PATH (a folder, glob or file of training images) when given; else the training
split of the run --ckpt belongs to, rebuilt from its recipe.yaml as vggnet eval does (the embedded digits
for the demo, the ImageFolder tree it names...; never its validation split); else an error: a bare
.safetensors file outside a run folder needs --calib-data. --calib-images of them (default 256), spread
evenly and so deterministic, preprocessed exactly as at prediction (shorter side to the test scale,
centre crop, mean/std). The check runs on the run's validation images when they can be read, else on
the training / --calib-data images left over after calibration.

examples:
  vggnet export --ckpt runs/cifar10 --format onnx --out exports/cifar10.onnx
  vggnet export --ckpt runs/cifar10/best.safetensors --format pt2 --out exports/cifar10.pt2
  vggnet export --ckpt runs/cifar10 --out exports/cifar10.pt        # format from the suffix
  vggnet export --ckpt runs/demo --format onnx-int8 --out exports/demo.int8.onnx
  vggnet export --ckpt model.safetensors --format onnx-int8 --out m.int8.onnx --calib-data data/train \\
      --calib-images 512
  vggnet export --ckpt runs/demo --out exports/demo.int8.pt2        # *.int8.onnx / *.int8.pt2: INT8
  vggnet export --ckpt runs/demo --format executorch --out exports/demo.pte
  vggnet export --ckpt runs/demo --format tflite-int8 --out exports/demo.int8.tflite
"""

_SUFFIX_FORMATS = {".int8.onnx": "onnx-int8", ".int8.pt2": "pt2-int8", ".int8.pte": "executorch-int8",
                   ".int8.tflite": "tflite-int8"}
FORMATS = ("onnx", "onnx-int8", "pt2", "pt2-int8", "torchscript", "executorch", "executorch-int8", "tflite",
           "tflite-int8")  # vggnet.export.FORMATS, without importing torch for --help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX, .pt2 (AOTInductor), TorchScript, ExecuTorch (.pte) or LiteRT "
                       "(.tflite), fp32 or INT8, checked against eager",
        description=textwrap.fill(
            "Export a checkpoint for deployment with its preprocessing (mean, std, input size, class names) "
            "inside the file. The file is written under a temporary name, loaded back, compared with the "
            "eager model and only then renamed to --out. INT8 formats are calibrated now, on --calib-data when "
            "given, else on the run's own training split, so the file needs no calibration data later.",
            width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run folder or .safetensors checkpoint")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from the --out suffix: .onnx, .int8.onnx, .pt2, .int8.pt2, .pt, "
                   ".pte, .int8.pte, .tflite, .int8.tflite); tflite files are written at batch 1 and resized to "
                   "each batch at run time where the head allows it (gap), else run one image at a time")
    p.add_argument("--out", required=True, metavar="PATH", help="file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--calib-data", metavar="PATH",
                   help="INT8: calibration images (folder, glob or file of training images) instead of the run's "
                        "own training split from its recipe.yaml; needed for a checkpoint outside a run folder")
    p.add_argument("--calib-images", type=int, default=256, metavar="N",
                   help="INT8: calibration images, spread evenly over the training images (default: 256)")
    p.add_argument("--check-images", type=int, default=256, metavar="N",
                   help="INT8: held-out images the top-1 agreement with fp32 is measured on (default: 256)")
    p.add_argument("--min-agreement", type=float, default=0.98, metavar="F",
                   help="INT8: the share of held-out images whose top-1 must match fp32 (default: 0.98)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="executorch, executorch-int8: the largest batch the program runs at once; its memory is "
                   "planned for N images when it loads, and larger batches run in slices (default: 32)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=run)


def _format_from_name(out: str) -> str:
    from vggnet.export import format_for

    name = Path(out).name.lower()
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    if Path(out).suffix.lower() not in (".onnx", ".pt2", ".pt", ".ts", ".torchscript", ".jit", ".pte", ".tflite"):
        raise UsageError(f"cannot tell the format from --out {out}: pass --format {'|'.join(FORMATS)}")
    return format_for(out)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 2**10:.0f} KiB"


def run(args: argparse.Namespace) -> int:
    from vggnet.capture.calibration import describe
    from vggnet.export import INT8_FORMATS, export_model

    fmt = args.format or _format_from_name(args.out)
    int8 = fmt in INT8_FORMATS
    if not int8 and args.calib_data:
        raise UsageError(f"--calib-data applies to the INT8 formats ({', '.join(INT8_FORMATS)}), not --format {fmt}")
    for flag, value in (("--calib-images", args.calib_images), ("--check-images", args.check_images)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0.0 <= args.min_agreement <= 1.0:
        raise UsageError(f"--min-agreement must be between 0 and 1, got {args.min_agreement}")
    if args.max_batch is not None and not fmt.startswith("executorch"):
        raise UsageError(f"--max-batch applies to the executorch formats, not --format {fmt}")
    if args.max_batch is not None and args.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {args.max_batch}")
    report = export_model(args.ckpt, fmt, args.out, opset=args.opset, calib_data=args.calib_data,
                          calib_images=args.calib_images, check_images=args.check_images,
                          min_agreement=args.min_agreement, max_batch=args.max_batch)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    errors = ", ".join(f"batch {b}: {e:.1e}" for b, e in report.max_rel_error.items())
    size = _mib(report.bytes)
    if report.size_ratio is not None:
        size += f", {report.size_ratio:.2f}x the {report.reference} ({_mib(report.reference_bytes)})"
    print(f"wrote {report.path} ({report.format}, {size}) in {report.seconds:.1f} s from {report.checkpoint}")
    if report.max_batch is not None:
        print(f"runs batches of 1 to {report.max_batch} images at once (--max-batch); larger ones in slices")
    elif report.resizable:
        print("written at batch 1; LiteRT's interpreter resizes the input to each batch (resize_tensor_input)")
    elif report.resizable is False:
        print("written at batch 1, not resizable (litert-torch fixes the batch in this head): runs one image at a "
              "time")
    if int8:
        check, calib = report.check, report.quantization["calibration"]
        print(f"top-1 agreement with eager fp32: {100 * report.agreement:.2f} % of {check['images']} "
              f"{check['description']} (required: {100 * report.min_agreement:.2f} %)")
        print(f"max relative logit error vs eager fp32: {errors}")
        print(f"calibrated on {calib['images']} images of {describe(calib)}"
              + (f" ({calib['unreadable']} unreadable, skipped)" if calib.get("unreadable") else "")
              + f"; weights {report.quantization['weights']}, activations {report.quantization['activations']}")
    else:
        print(f"max relative error vs eager fp32: {errors} (tolerance {report.tolerance:g})")
    prep = report.preprocessing
    classes = prep["classes"]
    shown = "none recorded" if classes is None else ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
    print(f"preprocessing: {prep['image_size']}x{prep['image_size']}, {prep['in_channels']} channels, "
          f"mean {prep['mean']}, std {prep['std']}; classes: {shown}")
    return 0
