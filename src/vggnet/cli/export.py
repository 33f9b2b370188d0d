"""``vggnet export``: a checkpoint as ONNX, an AOTInductor ``.pt2`` package or TorchScript, fp32 or INT8, checked
against eager."""

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

Every file is loaded back and checked against the eager fp32 model before it is kept. fp32 formats run at
batch 1, 3 and 8: max |exported - eager| / max |eager| must be <= 1e-4 (onnx, pt2) or 1e-5 (torchscript).
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
"""

_SUFFIX_FORMATS = {".int8.onnx": "onnx-int8", ".int8.pt2": "pt2-int8"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX, .pt2 (AOTInductor) or TorchScript, fp32 or INT8, checked "
                       "against eager",
        description=textwrap.fill(
            "Export a checkpoint for deployment with its preprocessing (mean, std, input size, class names) "
            "inside the file. The file is written under a temporary name, loaded back, compared with the "
            "eager model and only then renamed to --out. INT8 formats are calibrated now, on --calib-data when "
            "given, else on the run's own training split, so the file needs no calibration data later.",
            width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run folder or .safetensors checkpoint")
    p.add_argument("--format", choices=("onnx", "onnx-int8", "pt2", "pt2-int8", "torchscript"), default=None,
                   help="output format (default: from the --out suffix: .onnx, .int8.onnx, .pt2, .int8.pt2, .pt)")
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
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=run)


def _format_from_name(out: str) -> str:
    from vggnet.export import format_for

    name = Path(out).name.lower()
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    if Path(out).suffix.lower() not in (".onnx", ".pt2", ".pt", ".ts", ".torchscript", ".jit"):
        raise UsageError(f"cannot tell the format from --out {out}: pass --format "
                         "onnx|onnx-int8|pt2|pt2-int8|torchscript")
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
    report = export_model(args.ckpt, fmt, args.out, opset=args.opset, calib_data=args.calib_data,
                          calib_images=args.calib_images, check_images=args.check_images,
                          min_agreement=args.min_agreement)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    errors = ", ".join(f"batch {b}: {e:.1e}" for b, e in report.max_rel_error.items())
    size = _mib(report.bytes)
    if report.size_ratio is not None:
        size += f", {report.size_ratio:.2f}x the {report.reference} ({_mib(report.reference_bytes)})"
    print(f"wrote {report.path} ({report.format}, {size}) in {report.seconds:.1f} s from {report.checkpoint}")
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
