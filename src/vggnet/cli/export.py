"""``vggnet export``: a checkpoint as ONNX, an AOTInductor ``.pt2`` package or TorchScript, checked against eager."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

EPILOG = """\
formats:
  onnx         dynamo exporter, dynamic batch dimension ("batch"), checked with onnx.checker and run with
               ONNX Runtime; input "input" (N x C x S x S float32, normalised), output "logits".
               Metadata: metadata_props "vggnet" (JSON) plus "mean", "std", "image_size", "in_channels",
               "classes" (each JSON).
  pt2          torch.export with a dynamic batch, compiled by AOTInductor (needs a C++ compiler; minutes for
               VGG-16). Load with torch._inductor.aoti_load_package(path); metadata in
               compiled.get_metadata()["vggnet"].
  torchscript  torch.jit.trace (deprecated upstream; for libtorch consumers). Metadata in the extra file
               "vggnet.json" (torch.jit.load(path, _extra_files={"vggnet.json": ""})).

Every file is loaded back and run at batch 1, 3 and 8 against the eager fp32 model before it is kept:
max |exported - eager| / max |eager| must be <= 1e-4 (onnx, pt2) or 1e-5 (torchscript). Read one back in
Python with vggnet.export.load_exported(path), or predict with it: vggnet predict --ckpt model.onnx IMAGE.

examples:
  vggnet export --ckpt runs/cifar10 --format onnx --out exports/cifar10.onnx
  vggnet export --ckpt runs/cifar10/best.safetensors --format pt2 --out exports/cifar10.pt2
  vggnet export --ckpt runs/cifar10 --out exports/cifar10.pt        # format from the suffix
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX, .pt2 (AOTInductor) or TorchScript, checked against eager",
        description=textwrap.fill(
            "Export a checkpoint for deployment with its preprocessing (mean, std, input size, class names) "
            "inside the file. The file is written under a temporary name, loaded back, compared with the "
            "eager model and only then renamed to --out.", width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run folder or .safetensors checkpoint")
    p.add_argument("--format", choices=("onnx", "pt2", "torchscript"), default=None,
                   help="output format (default: from the --out suffix: .onnx, .pt2, .pt)")
    p.add_argument("--out", required=True, metavar="PATH", help="file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vggnet.export import export_model, format_for

    fmt = args.format
    if fmt is None:
        if Path(args.out).suffix.lower() not in (".onnx", ".pt2", ".pt", ".ts", ".torchscript", ".jit"):
            raise ValueError(f"cannot tell the format from --out {args.out}: pass --format onnx|pt2|torchscript")
        fmt = format_for(args.out)
    report = export_model(args.ckpt, fmt, args.out, opset=args.opset)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    errors = ", ".join(f"batch {b}: {e:.1e}" for b, e in report.max_rel_error.items())
    print(f"wrote {report.path} ({report.format}, {report.bytes / 2**20:.1f} MiB) in {report.seconds:.1f} s "
          f"from {report.checkpoint}")
    print(f"max relative error vs eager fp32: {errors} (tolerance {report.tolerance:g})")
    prep = report.preprocessing
    classes = prep["classes"]
    shown = "none recorded" if classes is None else ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
    print(f"preprocessing: {prep['image_size']}x{prep['image_size']}, {prep['in_channels']} channels, "
          f"mean {prep['mean']}, std {prep['std']}; classes: {shown}")
    return 0
